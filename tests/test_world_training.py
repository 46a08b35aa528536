"""Training the narrative-world model with the recipes: the world pipeline as the recipe's base
(``model.pipeline``), every weight trained on batches of whole scripts, and the export of the
trained adapter as the packaged model."""

import dataclasses
from pathlib import Path

import pytest
import torch

import memflow_apps.world as world
from memflow_adapter import MemFlowAdapter, remove_memflow
from memflow_apps.world.dataset import write_dataset
from memflow_apps.world.export import export, plot_training_curve
from recipes.config import ConfigError, load_config
from recipes.memory_finetune import MemoryFinetune, MemoryFinetuneConfig
from recipes.training import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TRAIN_YAML = Path(world.__file__).with_name("train.yaml")
GUIDED_YAML = Path(world.__file__).with_name("train_guided.yaml")
FACTORY = "memflow_apps.world.pipeline:build_world_pipeline"


@pytest.fixture(scope="module")
def world_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("world"), videos=3)


def test_the_packaged_training_config_trains_the_world_model_with_memory():
    config = load_config(MemoryFinetuneConfig, TRAIN_YAML)
    assert config.model.pipeline == FACTORY and not config.model.tiny
    assert config.memflow == world.WORLD_MEMORY
    assert config.model.train == "full"
    # whole scripts (12 chunks), the loss on each chunk with the memory of the chunks before it
    assert config.data.windows == "random" and config.data.chunks_per_sample == 12
    assert config.data.loss_chunks == "all" and config.data.videos_per_step == 4


def test_the_guided_stages_continue_the_packaged_training_with_prompt_dropout():
    base = load_config(MemoryFinetuneConfig, TRAIN_YAML)
    guided = load_config(MemoryFinetuneConfig, GUIDED_YAML)
    assert guided.model == dataclasses.replace(base.model, student_weights="outputs/world/adapter")
    assert guided.memflow == base.memflow and guided.schedule == base.schedule
    assert guided.data == dataclasses.replace(base.data, prompt_dropout=0.15)
    assert guided.training.learning_rate < base.training.learning_rate
    assert guided.training.seed == base.training.seed


def test_an_unknown_pipeline_factory_is_a_config_error(world_dataset, tmp_path):
    with pytest.raises(ConfigError, match="model.pipeline='memflow_apps.world:nope'"):
        main("memory_finetune", MemoryFinetuneConfig, MemoryFinetune, [
            "--config", str(TRAIN_YAML), "model.pipeline=memflow_apps.world:nope",
            f"data.dataset={world_dataset}", f"training.output_dir={tmp_path}",
        ])


@pytest.mark.slow
def test_a_short_run_trains_every_weight_on_whole_scripts_and_exports_the_model(
    world_dataset, tmp_path
):
    windows, runs = [], []

    class Recorded(MemoryFinetune):
        def __init__(self, *args):
            super().__init__(*args)
            runs.append(self)

        def _window(self, indices, randomness):
            window = super()._window(indices, randomness)
            windows.append((tuple(window[0].shape), window[1]))
            return window

    out = tmp_path / "run"
    main("memory_finetune", MemoryFinetuneConfig, Recorded, [
        "--config", str(TRAIN_YAML), f"data.dataset={world_dataset}",
        f"training.output_dir={out}", "training.max_steps=2", "training.lr_warmup_steps=0",
        "training.checkpoint_every=2",
    ])
    assert windows == [((4, 12, 24, 16, 16), [0, 4, 8, 12, 16, 20])] * 2

    adapter = MemFlowAdapter.from_pretrained(out / "adapter")
    assert adapter.base_model == FACTORY and adapter.config == world.WORLD_MEMORY
    assert adapter.lora_state is None
    trained = runs[0].student.model
    base = world.build_world_pipeline().transformer.state_dict()
    assert all(not torch.equal(value, base[key]) for key, value in adapter.base_weights.items())

    folder = export(out / "adapter", tmp_path / "model")
    curve = plot_training_curve([out / "metrics.jsonl"], tmp_path / "curve.png")
    assert curve.read_bytes()[:4] == b"\x89PNG"
    stages = plot_training_curve([out / "metrics.jsonl"] * 2, tmp_path / "stages.png")
    assert stages.read_bytes()[:4] == b"\x89PNG"
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
