"""Helios integration specifics (the family-independent specification is test_families.py): RoPE
over pass-relative frame indices, text keys, the refused history latents and chunked decoding."""

from contextlib import contextmanager

import pytest
import torch
from diffusers import AutoencoderKLWan, HeliosPipeline

from integrations import find_integration
from integrations.helios import HELIOS_LATENT_FRAMES_PER_CHUNK
from memflow_adapter import MemFlowConfig, apply_memflow
from memflow_apps.shared.tiny_wan import TINY_VAE

from families import FAMILIES

# Only after families: it imports every family_*.py module, each of which imports it.
from family_helios import tiny_helios

HELIOS = FAMILIES["helios"]
CHUNK = 3
GRID = 2  # a 4x4 latent is a 2x2 patch grid


def rope_at(model, frame_indices: list[int], frame_offset: int | None = None) -> torch.Tensor:
    """``[1, 2 * D, F, 2, 2]``: the model's own RoPE at ``frame_indices``, or the integration's
    with the indices taken relative to ``frame_offset``."""
    kwargs = {"frame_indices": torch.tensor([frame_indices]), "height": GRID, "width": GRID}
    if frame_offset is None:
        return model.rope(**kwargs, device="cpu")
    return find_integration(model).rope_forward(
        model.rope, torch.tensor(frame_offset), **kwargs, device="cpu"
    )


@contextmanager
def first_chunk_open(model, inputs):
    """MemFlow on ``model``, a bound session with its first chunk open; yields the session and
    the prompt's text keys."""
    attachment = apply_memflow(model, MemFlowConfig.reference())
    session = attachment.create_session(*HELIOS.latent_size)
    text_keys = attachment.text_keys(inputs["encoder_hidden_states"])
    with attachment.bind(session):
        session.begin_chunk(text_keys)
        yield session, text_keys


def test_the_rope_offset_equals_the_full_video_rope_sliced_at_the_chunk():
    model = tiny_helios()
    full = rope_at(model, list(range(9)))
    assert torch.equal(rope_at(model, list(range(CHUNK)), frame_offset=6), full[:, :, 6:9])


def test_frame_indices_given_to_a_streamed_model_are_relative_to_the_pass():
    model = tiny_helios()
    assert torch.equal(rope_at(model, [0, 2], frame_offset=6), rope_at(model, [6, 8]))


@torch.no_grad()
def test_the_hooked_rope_rotates_a_pass_at_its_absolute_frames(generator):
    model = tiny_helios()
    inputs = HELIOS.make_inputs(generator, CHUNK)
    with first_chunk_open(model, inputs) as (session, text_keys):
        with session.context_pass():
            HELIOS.forward(model, inputs)
        session.begin_chunk(text_keys)
        with session.denoise_pass():
            hooked = rope_at(model, list(range(CHUNK)))
    assert torch.equal(hooked, rope_at(tiny_helios(), [3, 4, 5]))


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_text_keys_are_the_keys_the_models_cross_attention_computes(generator, fused):
    model = tiny_helios()
    if fused:
        model.fuse_qkv_projections()
    inputs = HELIOS.make_inputs(generator, CHUNK)
    computed = []
    handles = [
        block.attn2.norm_k.register_forward_hook(lambda _m, _i, out: computed.append(out))
        for block in model.blocks
    ]
    HELIOS.forward(model, inputs)
    for handle in handles:
        handle.remove()
    keys = find_integration(model).text_keys(inputs["encoder_hidden_states"])
    assert [tuple(k.shape) for k in keys] == [(1, 8, 2, 12)] * 2
    for layer_keys, direct in zip(keys, computed, strict=True):
        assert torch.equal(layer_keys, direct.unflatten(2, (2, -1)))


@torch.no_grad()
def test_history_latents_are_refused_while_streaming(generator):
    model = tiny_helios()
    inputs = HELIOS.make_inputs(generator, CHUNK)
    history = {
        "latents_history_short": torch.randn(1, 16, 2, 4, 4, generator=generator),
        "indices_latents_history_short": torch.tensor([[0, 1]]),
    }
    with (
        first_chunk_open(model, inputs) as (session, _),
        pytest.raises(ValueError, match="takes no history latents.*got 8 history tokens"),
        session.denoise_pass(),
    ):
        HELIOS.forward(model, {**inputs, **history})


@torch.no_grad()
def test_history_key_amplification_is_moot_without_history(generator):
    """Helios scales history keys only; a streamed chunk has none, so the first chunk (which
    attends only to itself) equals the model's own forward."""
    model = tiny_helios(is_amplify_history=True)
    inputs = HELIOS.make_inputs(generator, CHUNK)
    expected = HELIOS.forward(model, inputs)
    with first_chunk_open(model, inputs) as (session, _), session.context_pass():
        streamed = HELIOS.forward(model, inputs)
    torch.testing.assert_close(streamed, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_latents_are_decoded_one_helios_chunk_at_a_time(generator):
    assert HELIOS_LATENT_FRAMES_PER_CHUNK == 9  # HeliosPipeline's num_latent_frames_per_chunk
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TINY_VAE).eval()
    integration = find_integration(tiny_helios())
    assert integration.pipeline_class is HeliosPipeline
    latents = torch.randn(1, 16, 12, 2, 2, generator=generator)
    video = integration.decode_latents(vae, latents)
    assert video.shape == (1, 3, 33 + 9, 16, 16)  # 1 + 4 * (9 - 1), then 1 + 4 * (3 - 1)
    torch.testing.assert_close(video[:, :, 33:], integration.decode_latents(vae, latents[:, :, 9:]))
