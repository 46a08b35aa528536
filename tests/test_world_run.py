"""The world v2 training run kept in the repository (runs/world-v2, issue "A world that shows
memory"): its committed state is a whole training state, and training resumed from it continues
bit-identically whether or not it is interrupted again."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memflow_apps.world.dataset import write_dataset
from memflow_apps.world.export import CHECKPOINT_WEIGHTS
from recipes.config import load_config
from recipes.memory_finetune import MemoryFinetune, MemoryFinetuneConfig
from recipes.training import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

RUN = Path(__file__).resolve().parents[1] / "runs" / "world-v2"
#: The run's stages begun so far: each a config ``<stage>.yaml`` whose output folder is
#: ``<stage>/``.
STAGES = sorted(config.stem for config in RUN.glob("*.yaml") if (RUN / config.stem).is_dir())


def committed_checkpoint(stage: str) -> tuple[Path, int]:
    """The stage's one committed checkpoint folder and its step."""
    folders = list((RUN / stage / "checkpoints").glob("checkpoint-*"))
    assert len(folders) == 1, f"runs/world-v2/{stage} must keep exactly one checkpoint: {folders}"
    return folders[0], int(re.fullmatch(r"checkpoint-(\d+)", folders[0].name).group(1))


@pytest.mark.parametrize("stage", STAGES)
def test_the_committed_checkpoint_is_a_whole_training_state_under_30_mb(stage):
    folder, step = committed_checkpoint(stage)
    assert step >= 1
    files = {path.name: path.stat().st_size for path in folder.iterdir() if path.is_file()}
    assert CHECKPOINT_WEIGHTS in files and "optimizer.bin" in files
    assert "scheduler.bin" in files and "training_state.json" in files
    assert any(name.startswith("random_states") for name in files)
    assert sum(files.values()) < 30 * 2**20


@pytest.mark.parametrize(("stage", "start"), [("memory", "teacher"), ("memory-return16", "memory")])
def test_a_stage_starts_from_the_committed_checkpoint_of_the_one_before(stage, start):
    config = load_config(MemoryFinetuneConfig, RUN / f"{stage}.yaml")
    assert Path(config.model.student_weights) == committed_checkpoint(start)[0].relative_to(
        RUN.parents[1]
    )
    assert config.training.output_dir == Path("runs/world-v2") / stage


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_training_resumed_from_the_committed_state_continues_bit_identically(stage, tmp_path):
    checkpoint, step = committed_checkpoint(stage)
    data = write_dataset(tmp_path / "data", videos=2, edition="v2")
    common = [
        "--config", str(RUN / f"{stage}.yaml"), f"data.dataset={data}", "data.videos_per_step=1",
        f"training.max_steps={step + 2}", "training.lr_scheduler=constant",
        "training.checkpoint_every=1", "training.checkpoints_total_limit=null",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main("memory_finetune", MemoryFinetuneConfig, MemoryFinetune, [
        *common, f"training.output_dir={straight}", f"training.resume_from={checkpoint}",
    ])
    main("memory_finetune", MemoryFinetuneConfig, MemoryFinetune, [
        *common, f"training.output_dir={resumed}",
        f"training.resume_from={straight / 'checkpoints' / f'checkpoint-{step + 1}'}",
    ])
    final = f"checkpoints/checkpoint-{step + 2}/{CHECKPOINT_WEIGHTS}"
    straight_weights, resumed_weights = load_file(straight / final), load_file(resumed / final)
    assert straight_weights.keys() == resumed_weights.keys()
    for key, value in straight_weights.items():
        assert torch.equal(value, resumed_weights[key]), key
    # the two steps continued the committed weights (they moved them, and only a little)
    committed = load_file(checkpoint / CHECKPOINT_WEIGHTS)
    moved = [torch.linalg.vector_norm(straight_weights[key] - value) /
             torch.linalg.vector_norm(value).clamp_min(1e-12) for key, value in committed.items()]
    assert max(moved) > 0 and sum(moved) / len(moved) < 0.05
