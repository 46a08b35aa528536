"""The fine-tune recipes end to end on tiny random models (CPU): what trains, what stays frozen,
NaN stops, exact resume, Ctrl-C, gradient checkpointing, the output adapter, and a 2-process run."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from latent_datasets import write_latent_datasets
from safetensors.torch import load_file

from memflow_adapter import MemFlowAdapter, MemFlowConfig, get_memflow
from memflow_adapter.streaming import ChunkEngine
from memflow_apps.shared.latents import DatasetError, VideoLatents
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline
from recipes import memory_finetune, streaming_long_tuning
from recipes.interrupt import StopOnInterrupt
from recipes.models import has_lora, lora_state_dict, trained_state_dict
from recipes.training import NonFiniteLossError, exit_on_bad_input, main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

RECIPES = {"streaming_long_tuning": streaming_long_tuning, "memory_finetune": memory_finetune}
#: The recipes with streaming_long_tuning marked slow (its DMD steps take seconds each here).
RECIPE_PARAMS = [
    pytest.param("streaming_long_tuning", marks=pytest.mark.slow), "memory_finetune"
]
CONFIGS = {
    "streaming_long_tuning": streaming_long_tuning.StreamingLongTuningConfig,
    "memory_finetune": memory_finetune.MemoryFinetuneConfig,
}
RECIPE_TYPES = {
    "streaming_long_tuning": streaming_long_tuning.StreamingLongTuning,
    "memory_finetune": memory_finetune.MemoryFinetune,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three videos of 8x8 latents: 10, 13 and 7 latent frames (5, 6 and 3 two-frame chunks,
    13 leaves a tail frame), one to three prompt segments, tiny-pipeline-sized embeddings."""
    return write_latent_datasets(
        tmp_path_factory.mktemp("latents"), [(10, [0, 4]), (13, [0, 3, 9]), (7, [0])]
    )


def overrides(name, output_dir, dataset, *extra):
    args = ["--tiny", f"training.output_dir={output_dir}", "validation.every_steps=0", *extra]
    if name == "memory_finetune":
        args.append(f"data.dataset={dataset}")
    return args


def run(name, argv):
    """Run recipe ``name`` in this process; returns the recipe object (its models are the trained
    ones) with ``initial``: what each trained model trains (its LoRA, or all of its weights)
    right after construction."""
    runs = []

    class Recorded(RECIPE_TYPES[name]):
        def __init__(self, *args):
            super().__init__(*args)
            self.initial = {n: trained_state_dict(t.model) for n, t in self.trainables().items()}
            runs.append(self)

    main(name, CONFIGS[name], Recorded, argv)
    return runs[0]


def base_weights(model):
    """The frozen weights, under the names of the model without LoRA."""
    return {
        key.replace(".base_layer", ""): value
        for key, value in model.state_dict().items()
        if "lora_" not in key
    }


def assert_same_weights(actual, expected):
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


@pytest.mark.parametrize("name", RECIPE_PARAMS)
def test_a_few_steps_train_the_lora_only_and_give_a_loadable_adapter(name, dataset, tmp_path):
    recipe = run(name, overrides(name, tmp_path, dataset, "training.max_steps=3"))

    base = build_tiny_wan_pipeline(0).transformer.state_dict()
    assert_same_weights(base_weights(recipe.student.model), base)
    for model_name, trainable in recipe.trainables().items():
        final = lora_state_dict(trainable.model)
        assert final.keys() == recipe.initial[model_name].keys() and len(final) == 4 * 10 * 2
        changed = [not torch.equal(final[k], v) for k, v in recipe.initial[model_name].items()]
        assert all(changed), f"{model_name}: some LoRA weights did not train"
    if name == "streaming_long_tuning":
        assert_same_weights(base_weights(recipe.critic), base)
        teacher = build_tiny_wan_pipeline(1).transformer.state_dict()
        assert_same_weights(recipe.teacher.state_dict(), teacher)

    adapter = MemFlowAdapter.from_pretrained(tmp_path / "adapter")
    assert adapter.config == recipe.config.memflow and adapter.lora_alpha == 4
    assert_same_weights(adapter.lora_state, lora_state_dict(recipe.student.model))
    fresh = build_tiny_wan_pipeline(0).transformer
    attachment = adapter.apply_to(fresh)
    assert get_memflow(fresh) is attachment and attachment.config == recipe.config.memflow
    assert_same_weights(lora_state_dict(fresh), adapter.lora_state)
    metrics = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3 and (tmp_path / "config.yaml").is_file()


def test_memory_finetune_can_take_its_loss_on_every_chunk_of_a_window(
    dataset, tmp_path, monkeypatch
):
    """``data.loss_chunks=all``: each chunk of the window is denoised with gradient once, with the
    memory of the chunks before it; the tiny config's 5-chunk windows over videos of 5, 6 and 3
    chunks make 5 + 5 + 3 gradient passes in the first three steps (one epoch)."""
    gradient_passes = []
    flow = ChunkEngine.flow

    def counted(self, noisy, timestep, embeds, grad=False):
        if grad:
            gradient_passes.append(noisy.shape[2])
        return flow(self, noisy, timestep, embeds, grad)

    monkeypatch.setattr(ChunkEngine, "flow", counted)
    recipe = run("memory_finetune", overrides(
        "memory_finetune", tmp_path, dataset, "training.max_steps=3", "data.loss_chunks=all"
    ))
    assert len(gradient_passes) == 13 and set(gradient_passes) == {2}
    final = lora_state_dict(recipe.student.model)
    assert all(not torch.equal(final[k], v) for k, v in recipe.initial["student"].items())


def test_segment_loss_weights_weight_each_chunks_loss_by_its_segment_in_the_video(
    dataset, tmp_path, monkeypatch
):
    """``data.segment_loss_weights``: the step's loss is the chunks' losses weighted by the
    segment of the video each chunk lies in; the chunks' own losses are those of the plain mean
    (the same draws), and a window past the last weight's segment is refused naming the file."""
    runs = {}
    chunk_loss = memory_finetune.MemoryFinetune._chunk_loss

    def recorded(self, engine, chunk, cond, video, randomness):
        loss = chunk_loss(self, engine, chunk, cond, video, randomness)
        self.chunk_losses.append((chunk.segment, float(loss.detach())))
        return loss

    class Recorded(memory_finetune.MemoryFinetune):
        def __init__(self, *args):
            super().__init__(*args)
            self.chunk_losses, self.step_losses = [], []
            runs[len(runs)] = self

        def train_phase(self, *args):
            self.step_losses.append(float(super().train_phase(*args)))
            return torch.tensor(self.step_losses[-1])

    monkeypatch.setattr(memory_finetune.MemoryFinetune, "_chunk_loss", recorded)
    # the first step's window: the 5 chunks of the first video, 2 in segment 0, 3 in segment 1
    for name, weights in (("mean", []), ("weighted", ["data.segment_loss_weights=[1, 3, 2]"])):
        main("memory_finetune", memory_finetune.MemoryFinetuneConfig, Recorded, overrides(
            "memory_finetune", tmp_path / name, dataset, "training.max_steps=1",
            "data.loss_chunks=all", *weights,
        ))
    plain, weighted = runs[0], runs[1]
    assert [s for s, _ in weighted.chunk_losses] == [0, 0, 1, 1, 1]
    assert weighted.chunk_losses == plain.chunk_losses
    losses = [loss for _, loss in weighted.chunk_losses]
    assert plain.step_losses[0] == pytest.approx(sum(losses) / 5, rel=1e-6)
    expected = (losses[0] + losses[1] + 3 * (losses[2] + losses[3] + losses[4])) / 11
    assert weighted.step_losses[0] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(DatasetError, match="segment_loss_weights has 1 weights, but the window"):
        run("memory_finetune", overrides(
            "memory_finetune", tmp_path / "short", dataset, "training.max_steps=1",
            "data.loss_chunks=all", "data.segment_loss_weights=[1]",
        ))


def test_prompt_dropout_denoises_some_loss_chunks_without_their_prompt(
    dataset, tmp_path, monkeypatch
):
    """``data.prompt_dropout``: a gradient pass sees zero embeddings with that probability, so
    the model learns the unconditional prediction of classifier-free guidance; the memory keeps
    the prompt (context and recache passes, and NAM's text keys, are those of the prompt)."""
    gradient_prompts, memory_prompts = [], []
    flow, open_chunk = ChunkEngine.flow, ChunkEngine.open_chunk
    commit = ChunkEngine.commit

    def spied_flow(self, noisy, timestep, embeds, grad=False):
        if grad:
            gradient_prompts.append(bool(embeds.any()))
        return flow(self, noisy, timestep, embeds, grad)

    def spied_open(self, chunk, cond, *args):
        memory_prompts.append(bool(cond.embeds.any()) and all(k.any() for k in cond.text_keys))
        return open_chunk(self, chunk, cond, *args)

    def spied_commit(self, clean, cond):
        memory_prompts.append(bool(cond.embeds.any()))
        return commit(self, clean, cond)

    monkeypatch.setattr(ChunkEngine, "flow", spied_flow)
    monkeypatch.setattr(ChunkEngine, "open_chunk", spied_open)
    monkeypatch.setattr(ChunkEngine, "commit", spied_commit)
    run("memory_finetune", overrides(
        "memory_finetune", tmp_path, dataset, "training.max_steps=6", "data.loss_chunks=all",
        "data.prompt_dropout=0.5",
    ))
    assert len(gradient_prompts) == 26
    assert 0 < gradient_prompts.count(False) < 26
    assert memory_prompts and all(memory_prompts)


@pytest.mark.parametrize("name", RECIPES)
def test_model_train_full_trains_every_student_weight_and_ships_them_in_the_adapter(
    name, dataset, tmp_path
):
    recipe = run(name, overrides(
        name, tmp_path, dataset, "training.max_steps=2", "model.train=full"
    ))
    student = recipe.student.model
    assert not has_lora(student)
    final, initial = trained_state_dict(student), recipe.initial["student"]
    assert final.keys() == build_tiny_wan_pipeline(0).transformer.state_dict().keys()
    assert_same_weights(initial, build_tiny_wan_pipeline(0).transformer.state_dict())
    trained = [key for key, parameter in student.named_parameters() if parameter.requires_grad]
    assert len(trained) == len(final)
    changed = [key for key in final if not torch.equal(final[key], initial[key])]
    assert len(changed) == len(final), f"unchanged: {sorted(final.keys() - set(changed))[:5]}"
    if name == "streaming_long_tuning":  # the critic still learns a LoRA, the teacher nothing
        assert has_lora(recipe.critic)
        teacher = build_tiny_wan_pipeline(1).transformer.state_dict()
        assert_same_weights(recipe.teacher.state_dict(), teacher)

    adapter = MemFlowAdapter.from_pretrained(tmp_path / "adapter")
    assert adapter.lora_state is None
    assert_same_weights(adapter.base_weights, final)
    fresh = build_tiny_wan_pipeline(0).transformer
    adapter.apply_to(fresh)
    assert_same_weights(fresh.state_dict(), final)
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "student_weights.safetensors").is_file()
    assert not (checkpoint / "student_lora.safetensors").exists()


def full_weight_run(output_dir, dataset, *extra):
    """``memory_finetune`` training every student weight."""
    name = "memory_finetune"
    return run(name, overrides(name, output_dir, dataset, "model.train=full", *extra))


def test_resuming_a_full_weight_run_continues_bit_identically(dataset, tmp_path):
    straight = full_weight_run(tmp_path / "a", dataset, "training.max_steps=4")
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    resumed = full_weight_run(tmp_path / "b", dataset, "training.max_steps=4",
                              f"training.resume_from={checkpoint}")
    assert_same_weights(
        trained_state_dict(resumed.student.model), trained_state_dict(straight.student.model)
    )


def test_a_full_weight_run_starts_from_another_runs_checkpoint(dataset, tmp_path):
    first = full_weight_run(tmp_path / "a", dataset, "training.max_steps=2")
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    second = full_weight_run(tmp_path / "b", dataset, "training.max_steps=1",
                             f"model.student_weights={checkpoint}")
    assert_same_weights(second.initial["student"], trained_state_dict(first.student.model))


@pytest.fixture(scope="module")
def one_layout_dataset(tmp_path_factory):
    """Three videos of one layout: 10 latent frames of 8x8, prompt segments starting at 0 and 4."""
    folder = tmp_path_factory.mktemp("one_layout")
    generator = torch.Generator().manual_seed(1)
    for name in "abc":
        VideoLatents(
            torch.randn(16, 10, 8, 8, generator=generator),
            torch.randn(2, 16, 32, generator=generator),
            torch.tensor([0, 4]),
            ("prompt 0", "prompt 1"),
        ).save(folder / f"{name}.safetensors")
    return folder


def test_memory_finetune_trains_videos_per_step_videos_as_one_batch(
    one_layout_dataset, tmp_path, monkeypatch
):
    """``data.videos_per_step=2``: every pass carries the two videos' rows, and three steps visit
    the three videos twice (two epochs, each in its own order)."""
    windows, batch_sizes = [], []
    window, flow = memory_finetune.MemoryFinetune._window, ChunkEngine.flow

    def recorded_window(self, indices, randomness):
        result = window(self, indices, randomness)
        windows.append((list(indices), result[0]))
        return result

    def recorded_flow(self, noisy, timestep, embeds, grad=False):
        if grad:
            batch_sizes.append((noisy.shape[0], timestep.shape[0], embeds.shape[0]))
        return flow(self, noisy, timestep, embeds, grad)

    monkeypatch.setattr(memory_finetune.MemoryFinetune, "_window", recorded_window)
    monkeypatch.setattr(ChunkEngine, "flow", recorded_flow)
    recipe = run("memory_finetune", overrides(
        "memory_finetune", tmp_path, one_layout_dataset, "training.max_steps=3",
        "data.videos_per_step=2",
    ))
    assert set(batch_sizes) == {(2, 2, 2)}
    visits = sorted(index for indices, _ in windows for index in indices)
    assert visits == [0, 0, 1, 1, 2, 2]
    for indices, latents in windows:
        for row, index in enumerate(indices):
            expected = recipe.dataset[index].latents[:, : latents.shape[2]]
            assert torch.equal(latents[row], expected)


def test_videos_of_different_layouts_in_one_step_are_refused_naming_the_option(
    dataset, tmp_path
):
    with pytest.raises(DatasetError, match=r"data.videos_per_step=3 needs videos of one layout"):
        run("memory_finetune", overrides(
            "memory_finetune", tmp_path, dataset, "training.max_steps=1", "data.videos_per_step=3"
        ))


def test_a_nan_loss_stops_the_run_naming_the_step(dataset, tmp_path):
    # A learning rate of 1e30 throws the LoRA to infinity in one step: step 2's loss is NaN.
    with pytest.raises(NonFiniteLossError, match="student loss is not finite at step 2"):
        run("memory_finetune", overrides(
            "memory_finetune", tmp_path, dataset, "training.learning_rate=1e30",
            "training.checkpoint_every=1",
        ))
    assert (tmp_path / "checkpoints" / "checkpoint-1").is_dir()
    assert not (tmp_path / "checkpoints" / "checkpoint-2").exists()
    assert not (tmp_path / "adapter").exists()


def test_an_fsdp_launch_is_refused_not_run_as_something_else(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    name = "streaming_long_tuning"
    with pytest.raises(RuntimeError, match="do not support FSDP.*DDP.*training.sharding=fsdp2"):
        run(name, overrides(name, tmp_path, None, "training.max_steps=1"))
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", RECIPE_PARAMS)
def test_resuming_from_a_checkpoint_continues_bit_identically(name, dataset, tmp_path):
    straight = run(name, overrides(name, tmp_path / "a", dataset, "training.max_steps=4"))
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    resumed = run(name, overrides(
        name, tmp_path / "b", dataset, "training.max_steps=4", f"training.resume_from={checkpoint}"
    ))
    for model_name, trainable in straight.trainables().items():
        expected = lora_state_dict(trainable.model)
        assert_same_weights(lora_state_dict(resumed.trainables()[model_name].model), expected)
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2


def metrics_rows(output_dir):
    """``metrics.jsonl`` without the timings, which differ from run to run."""
    rows = [json.loads(row) for row in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("seconds", "peak_memory_gib")}
            for row in rows]


def wait_for_line(process, text, timeout=300):
    """Read ``process``'s stderr until a line holding ``text``; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if text in line:
            return
        if not line and process.poll() is not None:
            break
    process.kill()
    pytest.fail(f"no line with {text!r} from the child process")


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_resuming_it_equals_an_uninterrupted_run(
    dataset, tmp_path
):
    """A real SIGINT to a child process training ``memory_finetune --tiny`` (no checkpoint due
    before its 5th step): it finishes the step it is in, saves that step's checkpoint, writes no
    adapter and ends in one line naming the checkpoint and how to resume, exit status 130.
    Resumed from there in the same folder, the run ends with the weights and the metrics of an
    uninterrupted run, bit for bit."""
    name, folder = "memory_finetune", tmp_path / "interrupted"
    args = overrides(name, folder, dataset, "training.max_steps=5",
                     "training.checkpoint_every=100", "training.log_every=1")
    child = subprocess.Popen(
        [sys.executable, "-m", f"recipes.{name}", *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "MEMFLOW_TRACEBACK": ""},
    )
    wait_for_line(child, "step 1 | ")
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=300)

    assert child.returncode == 130 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    stop = re.fullmatch(
        rf"python -m recipes.{name}: interrupted after step (\d+) of 5: checkpoint "
        r"saved to (.+); resume with training.resume_from=\2", last,
    )
    assert stop, last
    step, checkpoint = int(stop[1]), Path(stop[2])
    assert 1 <= step < 5
    assert checkpoint == folder / "checkpoints" / f"checkpoint-{step}"
    assert sorted((folder / "checkpoints").iterdir()) == [checkpoint]
    assert not (folder / "adapter").exists()
    assert [row["step"] for row in metrics_rows(folder)] == list(range(1, step + 1))

    resumed = run(name, [*args, f"training.resume_from={checkpoint}"])
    straight = run(name, overrides(name, tmp_path / "straight", dataset, "training.max_steps=5"))
    assert_same_weights(
        lora_state_dict(resumed.student.model), lora_state_dict(straight.student.model)
    )
    assert metrics_rows(folder) == metrics_rows(tmp_path / "straight")


def test_a_second_interrupt_stops_at_once():
    """Inside the loop's guard the first SIGINT only asks to stop after the step; the second
    raises ``KeyboardInterrupt`` where the run is; the previous handler is back after."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), StopOnInterrupt(announce=False) as interrupt:
        signal.raise_signal(signal.SIGINT)
        assert interrupt.requested
        signal.raise_signal(signal.SIGINT)
        pytest.fail("the second SIGINT did not stop the run")
    assert signal.getsignal(signal.SIGINT) is before


def test_a_recipe_stopped_at_once_ends_in_one_line_saying_how_to_resume(capsys):
    def stopped():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_status:
        exit_on_bad_input("memory_finetune", stopped)
    assert exit_status.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "python -m recipes.memory_finetune: stopped at once; the steps since the "
        "last checkpoint are lost; resume from it with training.resume_from=latest (and the same "
        "training.output_dir)"
    ]


def test_resuming_in_the_same_folder_logs_each_step_once(dataset, tmp_path):
    """A run resumed from an earlier checkpoint of its own folder (as after an interruption past
    the checkpoint) replaces the metrics rows of the steps it repeats."""
    name = "memory_finetune"
    run(name, overrides(name, tmp_path, dataset, "training.max_steps=4"))
    metrics = tmp_path / "metrics.jsonl"
    first = [json.loads(row) for row in metrics.read_text().splitlines()]
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    run(name, overrides(
        name, tmp_path, dataset, "training.max_steps=4", f"training.resume_from={checkpoint}"
    ))
    again = [json.loads(row) for row in metrics.read_text().splitlines()]
    assert [row["step"] for row in again] == [1, 2, 3, 4]
    assert [row["student_loss"] for row in again] == [row["student_loss"] for row in first]


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    name = "streaming_long_tuning"
    plain = run(name, overrides(name, tmp_path / "a", None, "training.max_steps=2"))
    checkpointed = run(name, overrides(
        name, tmp_path / "b", None, "training.max_steps=2", "training.gradient_checkpointing=true"
    ))
    assert checkpointed.student.model.is_gradient_checkpointing
    for model_name, trainable in plain.trainables().items():
        expected = lora_state_dict(trainable.model)
        actual = lora_state_dict(checkpointed.trainables()[model_name].model)
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_validation_rollouts_write_latents_video_and_memory_trace(tmp_path):
    name = "streaming_long_tuning"
    run(name, overrides(name, tmp_path, None, "training.max_steps=2", "validation.every_steps=2"))
    folder = tmp_path / "validation" / "step-000002"
    assert sorted(p.name for p in folder.iterdir()) == [
        "latents.safetensors", "memory_timeline.png", "report.json", "video.mp4"
    ]
    assert load_file(folder / "latents.safetensors")["latents"].shape == (1, 16, 8, 8, 8)
    report = (folder / "report.json").read_text()
    assert '"bank_frames"' in report and '"recached": true' in report


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_two_processes_train_identical_weights(name, dataset, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on the CPU); the three videos of different lengths give
    the two processes different numbers of passes, which must not desynchronise DDP."""
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import sys
        from safetensors.torch import save_file
        from recipes import {name} as module
        from recipes.models import lora_state_dict
        from recipes.training import main

        runs = []

        class Recorded(module.{RECIPE_TYPES[name].__name__}):
            def __init__(self, *args):
                super().__init__(*args)
                runs.append(self)

        main("{name}", module.{CONFIGS[name].__name__}, Recorded, sys.argv[1:])
        recipe = runs[0]
        for model_name, trainable in recipe.trainables().items():
            save_file(
                lora_state_dict(trainable.model),
                f"{tmp_path}/{{model_name}}-rank{{recipe.accelerator.process_index}}.safetensors",
            )
    """))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(worker),
        *overrides(name, tmp_path / "out", dataset, "training.max_steps=2"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    names = ["student", "critic"] if name == "streaming_long_tuning" else ["student"]
    for model_name in names:
        rank0 = load_file(tmp_path / f"{model_name}-rank0.safetensors")
        assert_same_weights(load_file(tmp_path / f"{model_name}-rank1.safetensors"), rank0)
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-2" / "random_states_1.pkl").is_file()
    adapter = MemFlowAdapter.from_pretrained(tmp_path / "out" / "adapter")
    assert_same_weights(adapter.lora_state, load_file(tmp_path / "student-rank0.safetensors"))
    assert adapter.config == MemFlowConfig.reference(
        sink_frames=1, bank_frames=2, local_frames=4, frames_per_chunk=2, record_interval=1
    )


@pytest.mark.slow
def test_a_recipe_on_a_missing_dataset_ends_in_one_line_and_exit_status_2(tmp_path):
    missing = tmp_path / "no-latents"
    done = subprocess.run(
        [sys.executable, "-m", "recipes.memory_finetune", "--tiny",
         f"data.dataset={missing}", f"training.output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "MEMFLOW_TRACEBACK": ""},
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"python -m recipes.memory_finetune: error: dataset folder "
        f"'{missing}' does not exist"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_build_dataset_on_a_missing_video_ends_in_one_line_and_exit_status_2(tmp_path):
    manifest = tmp_path / "videos.jsonl"
    manifest.write_text(json.dumps({"video": str(tmp_path / "nope.mp4"), "prompts": ["a"]}))
    done = subprocess.run(
        [sys.executable, "-m", "recipes.build_dataset", "--tiny",
         "--manifest", str(manifest), "--output", str(tmp_path / "ds")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "MEMFLOW_TRACEBACK": ""},
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m recipes.build_dataset: error: ")
    assert "nope.mp4" in last and "Traceback" not in done.stderr
