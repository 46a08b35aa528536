"""``training.sharding: fsdp2``: the recipes on torch's FSDP2 across 2 gloo processes (CPU).

One module fixture runs ``streaming_long_tuning --tiny`` three times (3 steps each): 2 processes
of 1 video sharded, 1 process of 2 videos unsharded (the same global batch), and 2 processes
resumed from the first run's step-2 checkpoint. Each run records, after its last step, what each
process holds of every transformer and the whole weights.
"""

import json
import math
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from latent_datasets import write_latent_datasets
from safetensors.torch import load_file

from memflow_adapter import MemFlowAdapter
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline
from recipes import streaming_long_tuning
from recipes.config import ConfigError, load_config
from recipes.training import main

NAME = "streaming_long_tuning"
TRANSFORMERS = ("student", "critic", "teacher")
#: LoRA after 3 steps of 2 processes x 1 video vs 1 process x 2 videos. The runs differ only in
#: float32 summation order (batch-2 vs batch-1 kernels, gloo's reduce-scatter of two gradients
#: vs one in-graph mean); measured max difference 2.7e-6. One AdamW step moves a weight by about
#: the learning rate (1e-3) whatever the gradient's scale, so 1e-4 (a tenth of a step) tolerates
#: reordered sums but not one update that went another way (another draw, a gradient missing a
#: rank's share).
LORA_ATOL = 1e-4

WORKER = """
import json
import sys

from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Shard

from recipes import {module} as module
from recipes.sharding import full_tensor, local_parameter_bytes
from recipes.training import main

out = sys.argv[1]


def record(recipe):
    rank = recipe.accelerator.process_index
    report = {{}}
    for name, model in recipe.transformers().items():
        parameters = dict(model.named_parameters())
        report[name] = {{
            "local_bytes": local_parameter_bytes(model),
            "shapes": {{key: list(p.shape) for key, p in parameters.items()}},
            "element_sizes": {{key: p.element_size() for key, p in parameters.items()}},
            "dim0_shards": sorted(
                key for key, p in parameters.items()
                if isinstance(p, DTensor) and p.placements == (Shard(0),)
            ),
        }}
        whole = {{k: full_tensor(v.detach()).contiguous() for k, v in model.state_dict().items()}}
        if rank == 0:
            save_file(whole, f"{{out}}/{{name}}.safetensors")
    with open(f"{{out}}/report-rank{{rank}}.json", "w") as handle:
        json.dump(report, handle)


class Recorded(module.{recipe}):
    def adapter(self):  # after the last step, on every process, the process group still alive
        record(self)
        return super().adapter()


main("{module}", module.{config}, Recorded, sys.argv[2:])
"""


def launch(folder, processes, *overrides, module=NAME, timeout=300):
    """Run the recording worker (``processes`` > 1: under torchrun, gloo); records go into
    ``folder``, the run's outputs into ``folder/out``."""
    recipe_type = {"streaming_long_tuning": "StreamingLongTuning",
                   "memory_finetune": "MemoryFinetune"}[module]
    config_type = f"{recipe_type}Config"
    worker = folder / "worker.py"
    folder.mkdir(parents=True, exist_ok=True)
    worker.write_text(textwrap.dedent(
        WORKER.format(module=module, recipe=recipe_type, config=config_type)
    ))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                     str(processes)]
    command = [*launcher, str(worker), str(folder), "--tiny",
               f"training.output_dir={folder / 'out'}", "validation.every_steps=0", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=folder)


def launched(folder, processes, *overrides):
    result = launch(folder, processes, *overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    # A cosine schedule (steps 1-3 at 1, 0.75 and 0.25 times the LR), so that the schedule and
    # its resumed state count too.
    steps = ("training.max_steps=3", "training.checkpoint_every=2",
             "training.lr_scheduler=cosine")
    sharded = launched(root / "sharded", 2, *steps, "training.sharding=fsdp2")
    single = launched(root / "single", 1, *steps, "rollout.batch_size=2")
    # Resume through `latest` from a copy of the sharded run's step-2 checkpoint, keeping 1.
    resumed = root / "resumed"
    shutil.copytree(sharded / "out/checkpoints/checkpoint-2",
                    resumed / "out/checkpoints/checkpoint-2")
    launched(resumed, 2, *steps, "training.sharding=fsdp2", "training.resume_from=latest",
             "training.checkpoints_total_limit=1", "validation.every_steps=3")
    return {"sharded": sharded, "single": single, "resumed": resumed}


def report(folder, rank=0):
    return json.loads((folder / f"report-rank{rank}.json").read_text())


def weights(folder, name):
    return load_file(folder / f"{name}.safetensors")


def dim0_share(shape, rank, world=2):
    """The elements of a ``shape`` tensor that ``rank`` holds when it is split on dim 0 as
    ``torch.chunk`` splits it (FSDP2's ``Shard(0)``)."""
    rows = len(range(shape[0])[rank * -(-shape[0] // world) :][: -(-shape[0] // world)])
    return rows * math.prod(shape[1:])


@pytest.mark.slow
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_every_transformer_is_sharded_on_dim_0_with_half_the_bytes_per_rank(runs, name):
    """Every parameter (the frozen base and the LoRA) is a DTensor split on dim 0; each rank
    holds exactly its dim-0 share. Measured: the student and the critic (base + LoRA)
    545,280 + 538,624 of 1,083,904 bytes, the teacher 500,224 + 493,568 of 993,792."""
    single = report(runs["single"])[name]
    ranks = [report(runs["sharded"], rank)[name] for rank in (0, 1)]
    for held in ranks:
        assert held["dim0_shards"] == sorted(single["shapes"])
    for rank, held in enumerate(ranks):
        expected = sum(
            dim0_share(shape, rank) * held["element_sizes"][key]
            for key, shape in held["shapes"].items()
        )
        assert held["local_bytes"] == expected
    assert sum(held["local_bytes"] for held in ranks) == single["local_bytes"]
    assert all(0.49 < held["local_bytes"] / single["local_bytes"] < 0.51 for held in ranks)


@pytest.mark.slow
def test_two_processes_of_one_video_train_the_lora_of_one_process_of_two(runs):
    """The same global batch (2 videos) trains the same LoRA, and the same losses, whether it is
    split across 2 sharded processes or run by 1; base weights and the teacher stay as built."""
    for name in ("student", "critic"):
        sharded, single = weights(runs["sharded"], name), weights(runs["single"], name)
        assert sharded.keys() == single.keys()
        lora = [key for key in single if "lora_" in key]
        assert len(lora) == 4 * 10 * 2
        assert all(sharded[key].abs().max() > 0 for key in lora)  # lora_B starts at zero
        for key in lora:
            torch.testing.assert_close(sharded[key], single[key], rtol=0, atol=LORA_ATOL)
        base = build_tiny_wan_pipeline(0).transformer.state_dict()
        for key in single.keys() - set(lora):
            assert torch.equal(sharded[key], base[key.replace(".base_layer", "")]), key
    teacher = build_tiny_wan_pipeline(1).transformer.state_dict()
    assert_equal_weights(weights(runs["sharded"], "teacher"), teacher)
    losses = [metrics(runs[run]) for run in ("sharded", "single")]
    assert [row["step"] for row in losses[0]] == [1, 2, 3]
    for sharded, single in zip(*losses, strict=True):
        for key in ("student_loss", "critic_loss"):
            assert sharded[key] == pytest.approx(single[key], rel=1e-5)
        for key in ("student_lr", "critic_lr"):
            assert sharded[key] == single[key]
        # AdamW does not see a gradient's scale; the norm does (a sum over processes instead of
        # the mean would double it).
        for key in ("student_grad_norm", "critic_grad_norm"):
            assert sharded[key] == pytest.approx(single[key], rel=1e-4)
    assert len({row["critic_lr"] for row in losses[0]}) == 3  # the schedule moves every step


@pytest.mark.slow
def test_the_adapter_holds_the_gathered_student_lora(runs):
    adapter = MemFlowAdapter.from_pretrained(runs["sharded"] / "out" / "adapter")
    student = weights(runs["sharded"], "student")
    gathered = {
        key.replace(".memflow.", "."): value for key, value in student.items() if "lora_" in key
    }
    assert_equal_weights(adapter.lora_state, gathered)


@pytest.mark.slow
def test_resuming_from_a_sharded_checkpoint_continues_bit_identically(runs):
    checkpoint = runs["sharded"] / "out" / "checkpoints" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "schedulers.pt", "sharded", "training_state.json"
    ]
    assert sorted(p.name for p in (checkpoint / "sharded").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"
    ]
    for name in TRANSFORMERS:
        assert_equal_weights(weights(runs["resumed"], name), weights(runs["sharded"], name))
    resumed = runs["resumed"] / "out"
    assert metrics(runs["resumed"])[0]["critic_lr"] == metrics(runs["sharded"])[2]["critic_lr"]
    assert [row["step"] for row in metrics(runs["resumed"])] == [3]
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["checkpoint-3"]
    validation = resumed / "validation" / "step-000003"
    assert (validation / "latents.safetensors").is_file() and (validation / "video.mp4").is_file()


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize(("overrides", "message"), [
    (["model.train=full"], r"model.train='full' is not supported with training.sharding=fsdp2"),
    ([], r"training.sharding=fsdp2 shards across processes but 1 was launched"),
])
def test_unsupported_combinations_stop_before_any_model_is_built(tmp_path, overrides, message):
    argv = ["--tiny", f"training.output_dir={tmp_path}", "training.sharding=fsdp2", *overrides]
    with pytest.raises(ConfigError, match=message):
        main(NAME, streaming_long_tuning.StreamingLongTuningConfig,
             streaming_long_tuning.StreamingLongTuning, argv)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_unknown_sharding_is_refused_naming_the_field():
    path = streaming_long_tuning.__file__.replace(".py", "_tiny.yaml")
    with pytest.raises(ConfigError, match=r"sharding must be one of \('none', 'fsdp2'\)"):
        load_config(streaming_long_tuning.StreamingLongTuningConfig, path,
                    ["training.sharding=zero3"])


@pytest.mark.slow
def test_memory_finetune_stops_every_rank_when_their_windows_plan_different_passes(tmp_path):
    """Videos of 10 and 13 latent frames with other prompt segments give the two processes
    different passes at step 1: both stop with the same error before any pass, no deadlock."""
    data = write_latent_datasets(tmp_path / "data", [(10, [0, 4]), (13, [0, 3, 9])])
    result = launch(tmp_path / "run", 2, f"data.dataset={data}", "training.sharding=fsdp2",
                    "training.max_steps=1", module="memory_finetune", timeout=180)
    assert result.returncode != 0
    error = (
        "DatasetError: training.sharding=fsdp2 runs every pass on every process at once, but at "
        "step 1 the processes' windows plan different passes"
    )
    for rank in (0, 1):
        assert f"[rank{rank}]: memflow_apps.shared.latents.{error}" in result.stderr
    assert not (tmp_path / "run" / "out" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_memory_finetune_trains_sharded_on_videos_of_one_layout(tmp_path):
    data = write_latent_datasets(tmp_path / "data", [(10, [0, 4])] * 2)
    run = tmp_path / "run"
    result = launch(run, 2, f"data.dataset={data}", "training.sharding=fsdp2",
                    "training.max_steps=2", module="memory_finetune", timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    student = weights(run, "student")
    lora_b = [key for key in student if "lora_B" in key]
    assert lora_b and all(student[key].abs().max() > 0 for key in lora_b)  # B starts at zero
    assert [row["step"] for row in metrics(run)] == [1, 2]


def metrics(folder):
    lines = (folder / "out" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_equal_weights(actual, expected):
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)

