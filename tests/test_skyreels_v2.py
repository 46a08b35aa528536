"""SkyReels-V2 integration specifics (the family-independent specification is test_families.py):
diffusion forcing's per-frame timesteps across denoising passes, the fps embedding, the model's
own block-causal mode, RoPE, text keys and the diffusion-forcing pipeline."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline
from diffusers.pipelines.skyreels_v2 import (
    pipeline_skyreels_v2_diffusion_forcing as df_pipeline_module,
)

from integrations import find_integration
from memflow_adapter import MemFlowConfig, apply_memflow, get_memflow, remove_memflow
from memflow_adapter.pipeline import MemFlowStreamingPipeline
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

from families import FAMILIES

# Only after families: it imports every family_*.py module, each of which imports it.
from family_skyreels_v2 import per_frame_timesteps, tiny_skyreels_v2

SKYREELS = FAMILIES["skyreels_v2"]
CHUNK = 3
FRAMES = 4 * CHUNK
TOKENS = SKYREELS.tokens_per_frame


def stream(model, config, inputs, denoise_steps=()):
    """Chunk by chunk: one read-only pass per entry of ``denoise_steps`` (whole-video inputs of
    one denoising step), then the context pass on ``inputs``; each pass gets its chunk's frames
    and their timesteps. Returns the context outputs ``[1, 16, FRAMES, 4, 4]``."""
    attachment = apply_memflow(model, config)
    session = attachment.create_session(*SKYREELS.latent_size)
    text_keys = attachment.text_keys(inputs["encoder_hidden_states"])
    outputs = []
    with attachment.bind(session):
        for start in range(0, FRAMES, CHUNK):
            session.begin_chunk(text_keys)
            for step in denoise_steps:
                with session.denoise_pass():
                    SKYREELS.forward(model, SKYREELS.chunk(step, start, start + CHUNK))
            with session.context_pass():
                chunk = SKYREELS.chunk(inputs, start, start + CHUNK)
                outputs.append(SKYREELS.forward(model, chunk))
    remove_memflow(model)
    return torch.cat(outputs, dim=2)


def denoising_steps(generator, inputs, count=2):
    """``count`` steps' inputs as diffusion forcing runs them: other latents and other per-frame
    timesteps in every step."""
    return [
        {
            **inputs,
            "hidden_states": torch.randn(inputs["hidden_states"].shape, generator=generator),
            "timestep": per_frame_timesteps(generator, FRAMES),
        }
        for _ in range(count)
    ]


@torch.no_grad()
@pytest.mark.parametrize("fps", [0, 1], ids=["16fps", "other_fps"])
def test_streaming_is_the_models_own_diffusion_forcing_causal_mode(generator, fps):
    """The model's built-in causal mode with one block per chunk is the block-causal reference."""
    inputs = {**SKYREELS.make_inputs(generator, FRAMES), "fps": [fps]}
    expected = SKYREELS.forward(tiny_skyreels_v2(num_frame_per_block=CHUNK), inputs)
    streamed = stream(tiny_skyreels_v2(), MemFlowConfig.full_history(), inputs)
    torch.testing.assert_close(streamed, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_the_fps_embedding_conditions_every_frame(generator):
    model = tiny_skyreels_v2()
    inputs = SKYREELS.make_inputs(generator, CHUNK)
    at_16fps = SKYREELS.forward(model, {**inputs, "fps": [0]})
    differs = (SKYREELS.forward(model, inputs) - at_16fps).abs().amax(dim=(0, 1, 3, 4))
    assert (differs > 1e-3).all()


@torch.no_grad()
def test_denoising_passes_at_other_timesteps_leave_the_context_pass_unchanged(generator):
    model = tiny_skyreels_v2()
    inputs = SKYREELS.make_inputs(generator, FRAMES)
    steps = denoising_steps(generator, inputs)
    other_timesteps = SKYREELS.forward(model, {**inputs, "timestep": steps[0]["timestep"]})
    assert not torch.allclose(other_timesteps, SKYREELS.forward(model, inputs), atol=1e-3)
    expected = SKYREELS.forward(tiny_skyreels_v2(num_frame_per_block=CHUNK), inputs)
    streamed = stream(model, MemFlowConfig.full_history(), inputs, steps)
    torch.testing.assert_close(streamed, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize(
    "config",
    [MemFlowConfig.reference(), MemFlowConfig.reference_sma()],
    ids=["reference", "reference_sma"],
)
def test_denoising_passes_change_nothing_with_memory_on(generator, config):
    model = tiny_skyreels_v2()
    inputs = SKYREELS.make_inputs(generator, FRAMES)
    without = stream(model, config, inputs)
    assert torch.equal(stream(model, config, inputs, denoising_steps(generator, inputs)), without)


@torch.no_grad()
def test_a_uniform_per_frame_timestep_is_the_plain_timestep(generator):
    """Diffusion forcing at one noise level for every frame is the model's usual forward, which is
    what a pipeline passing one timestep per chunk runs."""
    model = tiny_skyreels_v2()
    inputs = SKYREELS.make_inputs(generator, CHUNK)
    uniform = {**inputs, "timestep": torch.full((1, CHUNK), 700.0)}
    plain = {**inputs, "timestep": torch.tensor([700.0]), "enable_diffusion_forcing": False}
    torch.testing.assert_close(
        SKYREELS.forward(model, uniform), SKYREELS.forward(model, plain), rtol=1e-5, atol=1e-5
    )


def test_the_models_own_causal_mode_is_refused_and_the_model_left_unpatched():
    model = tiny_skyreels_v2(num_frame_per_block=CHUNK)
    processors = [block.attn1.processor for block in model.blocks]
    message = "num_frame_per_block must be 1, this SkyReelsV2Transformer3DModel has .*=3"
    with pytest.raises(ValueError, match=message):
        apply_memflow(model, MemFlowConfig.reference())
    assert [block.attn1.processor for block in model.blocks] == processors
    assert get_memflow(model) is None


def test_the_rope_offset_equals_the_full_video_rope_sliced_at_the_chunk():
    model = tiny_skyreels_v2()
    full = model.rope(torch.zeros(1, 16, 9, 4, 4))
    chunk = find_integration(model).rope_forward(
        model.rope, torch.tensor(6), torch.zeros(1, 16, CHUNK, 4, 4)
    )
    for table, full_table in zip(chunk, full, strict=True):
        assert torch.equal(table, full_table[:, 6 * TOKENS : 9 * TOKENS])


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_text_keys_are_the_keys_the_models_cross_attention_computes(generator, fused):
    model = tiny_skyreels_v2()
    if fused:
        model.fuse_qkv_projections()
    inputs = SKYREELS.make_inputs(generator, CHUNK)
    computed = []
    handles = [
        block.attn2.norm_k.register_forward_hook(lambda _m, _i, out: computed.append(out))
        for block in model.blocks
    ]
    SKYREELS.forward(model, inputs)
    for handle in handles:
        handle.remove()
    keys = find_integration(model).text_keys(inputs["encoder_hidden_states"])
    assert [tuple(k.shape) for k in keys] == [(1, 8, 2, 12)] * 2
    for layer_keys, direct in zip(keys, computed, strict=True):
        assert torch.equal(layer_keys, direct.unflatten(2, (2, -1)))


def tiny_skyreels_v2_pipeline(monkeypatch, **overrides) -> MemFlowStreamingPipeline:
    """The streaming pipeline assembled with SkyReels-V2's diffusion-forcing pipeline around a
    tiny SkyReels-V2 (the tiny Wan's text encoder is 32 wide)."""
    # That pipeline cleans prompts with ftfy unconditionally; ftfy is no test dependency and
    # prompt cleaning is not under test.
    monkeypatch.setattr(df_pipeline_module, "ftfy", SimpleNamespace(fix_text=str), raising=False)
    parts = build_tiny_wan_pipeline(seed=0)
    return MemFlowStreamingPipeline.from_components(
        MemFlowConfig.reference(),
        transformer=tiny_skyreels_v2(text_dim=32, **overrides),
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        device="cpu",
    )


def generate(pipe: MemFlowStreamingPipeline, **kwargs) -> torch.Tensor:
    output = pipe(
        "a red fox walks in the snow",
        num_latent_frames=2 * CHUNK,
        height=32,
        width=32,
        output_type="pt",
        max_sequence_length=16,
        progress=False,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    assert output.latents.shape == (1, 16, 2 * CHUNK, 4, 4)
    assert torch.isfinite(output.latents).all()
    return output.latents


def test_the_diffusion_forcing_pipeline_streams_a_model_without_the_fps_embedding(monkeypatch):
    """The DF-14B layout (no fps embedding): no fps input reaches the model."""
    pipe = tiny_skyreels_v2_pipeline(monkeypatch, inject_sample_info=False)
    assert type(pipe.pipe) is SkyReelsV2DiffusionForcingPipeline
    assert torch.equal(generate(pipe, fps=24), generate(pipe, fps=16))


def test_the_pipeline_passes_the_fps_class_to_a_model_with_the_fps_embedding(monkeypatch):
    """The DF-1.3B layout: 16 fps is class 0, any other rate class 1, as diffusers' pipeline."""
    pipe = tiny_skyreels_v2_pipeline(monkeypatch)
    integration = get_memflow(pipe.transformer).integration
    assert integration.conditioning_inputs(2, 16) == {"fps": [0, 0]}
    assert integration.conditioning_inputs(1, 24) == {"fps": [1]}
    assert torch.equal(generate(pipe, fps=24), generate(pipe, fps=30))
    assert not torch.allclose(generate(pipe, fps=24), generate(pipe, fps=16), atol=1e-4)
