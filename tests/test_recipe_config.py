"""Recipe configs (YAML, overrides, errors naming the field) and the recipes' small numerics."""

from pathlib import Path

import pytest
import torch

from memflow_adapter import MemFlowConfig
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_adapter.streaming import guided_flow, plan_chunks
from recipes import memory_finetune, streaming_long_tuning
from recipes.config import ConfigError, load_config
from recipes.dmd import distribution_matching_gradient, dmd_loss
from recipes.flow import NoiseRange, StepRandomness, sample_sigmas

PACKAGE = Path(streaming_long_tuning.__file__).parent
SLT = streaming_long_tuning.StreamingLongTuningConfig
MFT = memory_finetune.MemoryFinetuneConfig


@pytest.mark.parametrize(
    ("config_type", "file"),
    [
        (SLT, "streaming_long_tuning.yaml"),
        (SLT, "streaming_long_tuning_tiny.yaml"),
        (MFT, "memory_finetune.yaml"),
        (MFT, "memory_finetune_tiny.yaml"),
    ],
)
def test_the_packaged_configs_load(config_type, file):
    config = load_config(config_type, PACKAGE / file)
    assert config.model.tiny == file.endswith("_tiny.yaml")
    if not config.model.tiny:
        assert config.memflow == MemFlowConfig.reference()
        assert (config.lora.rank, config.lora.alpha) == (256, 256)
        assert config.training.gradient_checkpointing


def test_overrides_are_yaml_values_and_exponents_are_numbers():
    config = load_config(
        SLT,
        PACKAGE / "streaming_long_tuning_tiny.yaml",
        ["training.learning_rate=1e-5", "memflow.sma=true", "validation.prompts=[a, b]",
         "training.resume_from=latest", "dmd.noise.high=0.5"],
    )
    assert config.training.learning_rate == 1e-5 and config.memflow.sma
    assert config.validation.prompts == ("a", "b") and config.training.resume_from == "latest"
    assert config.dmd.noise == NoiseRange(0.02, 0.5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.max_steps=0", "training.max_steps must be an int >= 1, got 0"),
        ("training.max_steps=many", "training.max_steps must be an int, got 'many'"),
        ("training.max_stepz=3", r"unknown key\(s\) training.max_stepz"),
        ("training.mixed_precision=fp8", "training.mixed_precision must be one of"),
        ("memflow.sink_frames=-1", "memflow.sink_frames must be >= 0, got -1"),
        ("memflow.preset=nope", "memflow.preset must be one of"),
        ("dmd.noise.low=2", r"dmd.noise.low must be in \[0, 1\), got 2.0"),
        ("rollout.gradient_chunks=3", "rollout.gradient_chunks must be <= 2 so that the clip"),
        ("lora.rank=0", "lora.rank must be an int >= 1, got 0"),
        ("schedule.steps=[]", "schedule.steps must hold at least one timestep"),
        ("training", "overrides must look like section.key=value"),
        ("model.pipeline=nomodule", "model.pipeline must be 'module:function'"),
        ("model.pipeline=a.b:c", "model.tiny must be false when pipeline is set"),
    ],
)
def test_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SLT, PACKAGE / "streaming_long_tuning_tiny.yaml", [override])


def test_memory_finetune_windows_are_random_or_prefix():
    config = load_config(MFT, PACKAGE / "memory_finetune_tiny.yaml", ["data.windows=prefix"])
    assert config.data.windows == "prefix"
    with pytest.raises(ConfigError, match=r"data.windows must be one of \('random', 'prefix'\)"):
        load_config(MFT, PACKAGE / "memory_finetune_tiny.yaml", ["data.windows=all"])
    with pytest.raises(ConfigError, match=r"data.loss_chunks must be one of \('last', 'all'\)"):
        load_config(MFT, PACKAGE / "memory_finetune_tiny.yaml", ["data.loss_chunks=first"])
    with pytest.raises(ConfigError, match=r"data.prompt_dropout must be a probability in \[0, 1\)"):
        load_config(MFT, PACKAGE / "memory_finetune_tiny.yaml", ["data.prompt_dropout=1"])
    with pytest.raises(ConfigError, match=r"data.segment_loss_weights must be null or weights > 0"):
        load_config(MFT, PACKAGE / "memory_finetune_tiny.yaml", [
            "data.loss_chunks=all", "data.segment_loss_weights=[1, 0]"])
    with pytest.raises(ConfigError, match="data.loss_chunks must be 'all' when segment_loss_weig"):
        load_config(MFT, PACKAGE / "memory_finetune_tiny.yaml", ["data.segment_loss_weights=[1]"])


def test_the_command_line_reports_config_errors(capsys):
    with pytest.raises(SystemExit):
        memory_finetune.cli(["--tiny", "data.chunks_per_sample=1"])
    assert "data.chunks_per_sample must be an int >= 2, got 1" in capsys.readouterr().err


def test_the_dmd_surrogate_has_the_dmd_gradient():
    generator = torch.Generator().manual_seed(0)
    clip = torch.randn(2, 4, 3, 2, 2, generator=generator, dtype=torch.float64)
    real, fake = clip + torch.randn_like(clip), clip + torch.randn_like(clip)
    grad = distribution_matching_gradient(clip, real, fake)
    normaliser = (clip - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(grad, (fake - real) / normaliser)
    generated = clip.clone().requires_grad_(True)
    first, second = generated[:, :, :1], generated[:, :, 1:]
    target = clip - grad
    loss = dmd_loss(first, target[:, :, :1], clip.numel()) + dmd_loss(
        second, target[:, :, 1:], clip.numel()
    )
    loss.backward()
    torch.testing.assert_close(generated.grad, grad / clip.numel())
    torch.testing.assert_close(loss, 0.5 * (grad**2).mean())
    assert torch.equal(distribution_matching_gradient(clip, clip, fake), torch.zeros_like(clip))


def test_guidance_and_noise_levels():
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert guided_flow(cond, uncond, 3.0).item() == 4.0 and guided_flow(cond, None, 1.0) is cond
    schedule = FlowMatchSchedule()
    sigmas = sample_sigmas(schedule, NoiseRange(0.02, 0.98), 512, torch.Generator().manual_seed(0))
    table = schedule.sigma_table
    assert sigmas.dtype == torch.float64 and sigmas.shape == (512,)
    assert sigmas.min() >= table[979] and sigmas.max() <= table[20]
    # Local draws depend on (seed, step, global sample), shared ones on (seed, step) only.
    draws = [StepRandomness.for_step(0, 5, sample) for sample in (1, 1, 0)]
    local = [randomness.randn((1, 3), "cpu") for randomness in draws]
    assert torch.equal(local[0], local[1]) and not torch.equal(local[0], local[2])
    shared = [torch.randint(10**6, (4,), generator=randomness.shared) for randomness in draws]
    assert torch.equal(shared[0], shared[2])


def test_a_batch_draws_what_its_samples_draw_alone():
    """One process with samples 0 and 1 draws, row by row, what two processes of one sample
    each draw: a run's noise and data follow the global batch, not how it is split."""
    alone = [StepRandomness.for_step(0, 5, sample) for sample in (0, 1)]
    batch = StepRandomness.for_step(0, 5, 0, batch_size=2)
    schedule, noise = FlowMatchSchedule(), NoiseRange()
    rows = torch.cat([r.randn((1, 3), "cpu") for r in alone])
    assert torch.equal(batch.randn((2, 3), "cpu"), rows)
    sigmas = torch.cat([r.sigmas(schedule, noise) for r in alone])
    assert torch.equal(batch.sigmas(schedule, noise), sigmas)
    assert torch.equal(batch.rand(), torch.cat([r.rand() for r in alone]))
    with pytest.raises(ValueError, match="a draw for 3 batch rows from the generators of 2"):
        batch.randn((3, 2), "cpu")


def test_chunk_plans_switch_prompts_at_chunk_boundaries():
    # Segments start at frames 0, 3 and 7 with 2-frame chunks: the switches land on chunks 2, 4.
    plans = plan_chunks([0, 3, 7], 10, 2)
    assert [(p.start, p.stop, p.segment, p.recache) for p in plans] == [
        (0, 2, 0, False), (2, 4, 0, False), (4, 6, 1, True), (6, 8, 1, False), (8, 10, 2, True)
    ]
