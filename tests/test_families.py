"""The same specification for every supported model family (one row per family in families.py):
streaming equals the model's own block-causal forward, the memory presets stream
deterministically with a bounded cache, and MemFlow comes off without a trace."""

import pytest
import torch

from integrations import find_integration, supported_model_classes
from memflow_adapter import MemFlowConfig, apply_memflow, get_memflow, remove_memflow

from families import FAMILIES, Family
from tiny_models import tiny_wan

CHUNK = 3
rows = pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())


def block_causal_mask(num_frames: int, tokens_per_frame: int) -> torch.Tensor:
    """``[N, N]``: a token attends to every token of its own chunk and of earlier chunks."""
    chunk_of = torch.arange(num_frames).repeat_interleave(tokens_per_frame) // CHUNK
    return chunk_of[None, :] <= chunk_of[:, None]


def stream(family: Family, model, config, inputs, num_frames, denoise_passes=1):
    """Chunk by chunk: read-only passes then the context pass; the context outputs, concatenated."""
    attachment = apply_memflow(model, config)
    session = attachment.create_session(*family.latent_size)
    text_keys = attachment.text_keys(inputs["encoder_hidden_states"])
    outputs = []
    with attachment.bind(session):
        for start in range(0, num_frames, CHUNK):
            chunk = family.chunk(inputs, start, start + CHUNK)
            session.begin_chunk(text_keys)
            for _ in range(denoise_passes):
                with session.denoise_pass():
                    family.forward(model, chunk)
            with session.context_pass():
                outputs.append(family.forward(model, chunk))
    remove_memflow(model)
    return torch.cat(outputs, dim=family.frame_dim), session


@torch.no_grad()
@rows
def test_full_history_streaming_equals_the_block_causal_full_forward(family, generator):
    model = family.build()
    inputs = family.make_inputs(generator, 4 * CHUNK)
    mask = block_causal_mask(4 * CHUNK, family.tokens_per_frame)
    expected = family.masked_forward(model, inputs, mask)
    streamed, _ = stream(family, model, MemFlowConfig.full_history(), inputs, 4 * CHUNK)
    torch.testing.assert_close(streamed, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@rows
@pytest.mark.parametrize(
    "config",
    [MemFlowConfig.reference(), MemFlowConfig.reference_sma()],
    ids=["reference", "reference_sma"],
)
def test_memory_presets_stream_deterministically_with_a_bounded_cache(family, config, generator):
    model = family.build()
    frames = 10 * CHUNK
    inputs = family.make_inputs(generator, frames)
    first, session = stream(family, model, config, inputs, frames)
    second, _ = stream(family, model, config, inputs, frames)
    assert torch.equal(first, second) and torch.isfinite(first).all()
    assert session.layers[0].bank_frame_index[0].tolist() == [6, 15, 24]
    assert list(session.layers[0].window_frames) == list(range(frames - 6, frames))
    if config.sma:
        activated = session.trace()[-1].activated[0][-1].frames[0]
        assert all(len(frames) == 3 for frames in activated)


@torch.no_grad()
@rows
def test_remove_memflow_restores_the_model_bit_for_bit(family, generator):
    model = family.build()
    inputs = family.make_inputs(generator, 2 * CHUNK)
    before = family.forward(model, inputs)
    stream(family, model, MemFlowConfig.reference(), inputs, 2 * CHUNK)
    assert torch.equal(family.forward(model, inputs), before)


@rows
def test_the_integration_is_found_from_the_model_alone(family):
    integration = find_integration(family.build())
    assert integration.name == family.name
    assert integration.tokens_per_frame(*family.latent_size) == family.tokens_per_frame


def test_an_unsupported_model_is_refused_with_every_supported_family_listed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    supported = ", ".join(supported_model_classes())
    assert "WanTransformer3DModel" in supported
    message = f"cannot stream a Sequential; supported models: {supported}"
    with pytest.raises(TypeError, match=message):
        apply_memflow(model, MemFlowConfig.reference())
    assert not hasattr(model, "_diffusers_hook") or not model._diffusers_hook.hooks


def test_a_model_the_integration_rejects_is_left_without_any_patch():
    model = tiny_wan(patch_size=(2, 2, 2))  # streaming needs one token frame per latent frame
    processors = [block.attn1.processor for block in model.blocks]
    with pytest.raises(ValueError, match="temporal patch size of 1"):
        apply_memflow(model, MemFlowConfig.reference())
    assert [block.attn1.processor for block in model.blocks] == processors
    assert get_memflow(model) is None
