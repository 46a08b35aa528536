"""Training the narrative-world model with the recipes: the world pipeline as the recipe's base
(``model.pipeline``), prefix windows, and the export of the trained adapter as the packaged
model."""

from pathlib import Path

import pytest
import torch

import memflow_adapter.world as world
from memflow_adapter import MemFlowAdapter, remove_memflow
from memflow_adapter.recipes.config import ConfigError, load_config
from memflow_adapter.recipes.memory_finetune import MemoryFinetune, MemoryFinetuneConfig
from memflow_adapter.recipes.models import lora_state_dict
from memflow_adapter.recipes.training import main
from memflow_adapter.world.dataset import write_dataset
from memflow_adapter.world.export import export, plot_training_curve

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TRAIN_YAML = Path(world.__file__).with_name("train.yaml")
FACTORY = "memflow_adapter.world.pipeline:build_world_pipeline"


@pytest.fixture(scope="module")
def world_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("world"), videos=3)


def test_the_packaged_training_config_trains_the_world_model_with_memory():
    config = load_config(MemoryFinetuneConfig, TRAIN_YAML)
    assert config.model.pipeline == FACTORY and not config.model.tiny
    assert config.memflow == world.WORLD_MEMORY
    assert config.data.windows == "prefix" and config.data.chunks_per_sample == 12


def test_an_unknown_pipeline_factory_is_a_config_error(world_dataset, tmp_path):
    with pytest.raises(ConfigError, match="model.pipeline='memflow_adapter.world:nope'"):
        main("memory_finetune", MemoryFinetuneConfig, MemoryFinetune, [
            "--config", str(TRAIN_YAML), "model.pipeline=memflow_adapter.world:nope",
            f"data.dataset={world_dataset}", f"training.output_dir={tmp_path}",
        ])


def test_a_short_run_trains_prefix_windows_and_exports_a_loadable_model(world_dataset, tmp_path):
    windows, runs = [], []

    class Recorded(MemoryFinetune):
        def __init__(self, *args):
            super().__init__(*args)
            runs.append(self)

        def _window(self, sample, index, randomness):
            latents, starts, segments = super()._window(sample, index, randomness)
            windows.append((latents.shape[2], starts))
            return latents, starts, segments

    out = tmp_path / "run"
    main("memory_finetune", MemoryFinetuneConfig, Recorded, [
        "--config", str(TRAIN_YAML), f"data.dataset={world_dataset}",
        f"training.output_dir={out}", "training.max_steps=6", "training.lr_warmup_steps=0",
        "training.checkpoint_every=6", "lora.rank=4", "lora.alpha=4",
    ])
    # prefix windows start at the first chunk: segment starts are the script's, cut to length
    for frames, starts in windows:
        assert frames % 2 == 0 and 2 <= frames <= 24
        assert starts == [s for s in (0, 4, 8, 12, 16, 20) if s < frames]
    assert len({frames for frames, _ in windows}) > 1

    adapter = MemFlowAdapter.from_pretrained(out / "adapter")
    assert adapter.base_model == FACTORY and adapter.config == world.WORLD_MEMORY
    trained = runs[0].student.model
    assert any(value.abs().sum() > 0 for key, value in lora_state_dict(trained).items()
               if "lora_B" in key)

    folder = export(out / "adapter", tmp_path / "model")
    curve = plot_training_curve(out / "metrics.jsonl", tmp_path / "curve.png")
    assert curve.read_bytes()[:4] == b"\x89PNG"
    merged = world.load_world_pipeline(folder).transformer
    remove_memflow(trained)
    trained.eval()
    inputs = {
        "hidden_states": torch.randn(1, 12, 2, 16, 16, generator=torch.Generator().manual_seed(0)),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1)),
        "return_dict": False,
    }
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs)[0], trained(**inputs)[0], rtol=1e-4, atol=1e-5)


def test_export_refuses_an_adapter_of_another_memory_layout(tmp_path):
    adapter = MemFlowAdapter.for_model(
        world.build_world_pipeline().transformer,
        world.WORLD_MEMORY.__class__.longlive(frames_per_chunk=2),
        FACTORY,
    )
    adapter.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="the world model streams with"):
        export(tmp_path / "adapter", tmp_path / "out")
