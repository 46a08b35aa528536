"""The opt-in quantized KV cache (``MemFlowConfig.cache_dtype``, architecture s.2c): a byte or
less per element plus one scale per frame and head, close to the unquantized stream, codes moved
as they are, and saved and resumed exactly."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_long_streams import CHUNK, wan_stream

from memflow_adapter import MemFlowConfig, StreamingSession
from memflow_adapter.cache import LayerCache
from memflow_adapter.frame_buffer import FrameBuffer, dequantize_frames, quantize_frames

from tiny_models import tiny_wan

QUANTIZED = ["float8_e4m3fn", "int8"]
STORAGE = {"float8_e4m3fn": torch.float8_e4m3fn, "int8": torch.int8}
TOKENS = 4


@pytest.mark.parametrize("cache_dtype", QUANTIZED)
def test_a_frame_round_trips_within_half_a_step_of_its_format(cache_dtype, generator):
    tokens = torch.randn(2, 3 * TOKENS, 4, 16, generator=generator) * torch.tensor(
        [0.01, 1.0, 30.0, 500.0]
    ).view(1, 1, 4, 1)  # heads of very different magnitude: each gets its own scale
    codes, scale = quantize_frames(tokens, TOKENS, STORAGE[cache_dtype])
    assert codes.dtype == STORAGE[cache_dtype] and scale.shape == (2, 3, 4)
    error = (dequantize_frames(codes, scale, TOKENS, torch.float32) - tokens).abs()
    step = scale.repeat_interleave(TOKENS, dim=1)[..., None]  # one code step, per frame and head
    # int8: half a step; fp8 has 3 mantissa bits: half a step is 1/16 of the value, and below
    # 2**-6 (subnormals) steps are 2**-9 of the scale
    bound = step / 2 if cache_dtype == "int8" else tokens.abs() / 16 + step * 2**-10
    assert (error <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("cache_dtype", QUANTIZED)
def test_a_frame_of_zeros_is_stored_exactly(cache_dtype):
    codes, scale = quantize_frames(torch.zeros(1, TOKENS, 2, 8), TOKENS, STORAGE[cache_dtype])
    assert (scale == 1).all()
    assert torch.equal(dequantize_frames(codes, scale, TOKENS, torch.float32),
                       torch.zeros(1, TOKENS, 2, 8))


@pytest.mark.parametrize("cache_dtype", QUANTIZED)
def test_a_cached_frame_takes_half_the_bytes_of_bfloat16_and_a_quarter_of_float32(cache_dtype):
    """At Wan2.1-1.3B's frame size (1560 tokens x 128 channels per head) the per-frame scale is
    4 bytes in 200,000: bytes are halved against bfloat16 and quartered against float32."""
    tokens_per_frame, heads, head_dim = 1560, 2, 128
    config = MemFlowConfig.longlive(local_frames=3)  # sink 3, no window: 3 frames per tensor
    per_frame = {}
    for name, dtype, cache_dtype_ in (("bf16", torch.bfloat16, None),
                                      ("fp32", torch.float32, None),
                                      ("quantized", torch.bfloat16, cache_dtype)):
        cache = LayerCache(replace(config, cache_dtype=cache_dtype_), tokens_per_frame)
        frame = torch.zeros(1, 3 * tokens_per_frame, heads, head_dim, dtype=dtype)
        cache.append(frame, frame, 0)
        per_frame[name] = cache.nbytes / 3
    elements = tokens_per_frame * heads * head_dim * 2  # keys and values
    assert per_frame["quantized"] == elements + 2 * heads * 4  # one byte each, two scales
    assert per_frame["quantized"] / per_frame["bf16"] == pytest.approx(0.5, rel=1e-4)
    assert per_frame["quantized"] / per_frame["fp32"] == pytest.approx(0.25, rel=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("preset", ["reference", "reference_sma"])
@pytest.mark.parametrize("cache_dtype", QUANTIZED)
def test_a_quantized_stream_stays_close_to_the_unquantized_one(preset, cache_dtype):
    """12 chunks of a tiny Wan with two prompt switches (recaches and NAM selections read the
    quantized keys too). The relative RMS error measured here: 0.22% / 0.30% (fp8, reference /
    SMA) and 0.07% (int8); the bounds leave twice the larger, and the error is not zero (the cache
    really is quantized)."""
    model = tiny_wan()
    exact, _ = wan_stream(model, MemFlowConfig.preset(preset), 12, switches=(5, 9))
    quantized, session = wan_stream(
        model, MemFlowConfig.preset(preset, cache_dtype=cache_dtype), 12, switches=(5, 9)
    )
    assert session.layers[0].keys.codes.dtype == STORAGE[cache_dtype]
    relative_rms = ((quantized - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().item()
    assert 0 < relative_rms < {"float8_e4m3fn": 0.006, "int8": 0.0015}[cache_dtype]


@pytest.mark.parametrize("cache_dtype", QUANTIZED)
def test_frames_move_through_the_window_with_their_codes_unchanged(cache_dtype, generator):
    config = MemFlowConfig.longlive(sink_frames=0, cache_dtype=cache_dtype)
    cache = LayerCache(config, TOKENS)
    chunks = [torch.randn(1, CHUNK * TOKENS, 2, 8, generator=generator) for _ in range(3)]
    cache.append(chunks[0], chunks[0], 0)
    cache.append(chunks[1], chunks[1], CHUNK)
    first = cache.keys.raw(cache._window_slot(CHUNK), CHUNK)  # chunk 1, newest
    cache.append(chunks[2], chunks[2], 2 * CHUNK)
    moved = cache.keys.raw(cache._window_slot(CHUNK), CHUNK)  # chunk 1, one chunk older
    assert _same_bits(moved[0], first[0]) and torch.equal(moved[1], first[1])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@torch.no_grad()
@pytest.mark.parametrize("cache_dtype", QUANTIZED)
def test_a_quantized_session_saved_to_safetensors_resumes_bit_identically(cache_dtype, tmp_path):
    config = MemFlowConfig.reference(cache_dtype=cache_dtype)
    model = tiny_wan(rope_max_seq_len=16)  # past the table: re-based, re-quantized keys too
    whole, _ = wan_stream(model, config, 20, switches=(8,))
    _, paused = wan_stream(model, config, 10, switches=(8,))
    save_file(paused.state_dict(), tmp_path / "session.safetensors")
    state = load_file(tmp_path / "session.safetensors")
    rest, _ = wan_stream(model, config, 20, (8,), state, from_chunk=10)
    assert torch.equal(rest, whole[:, :, 10 * CHUNK :])


def test_a_quantized_state_does_not_load_into_an_unquantized_session():
    quantized = StreamingSession(MemFlowConfig.reference(cache_dtype="int8"), 1, TOKENS)
    plain = StreamingSession(MemFlowConfig.reference(), 1, TOKENS)
    with pytest.raises(ValueError, match="saved with config"):
        plain.load_state_dict(quantized.state_dict())


def test_stored_codes_of_another_format_are_refused_naming_both():
    buffer = FrameBuffer(torch.zeros(1, 0, 2, 8), 2, TOKENS, torch.int8)
    state = buffer.state("keys")
    with pytest.raises(ValueError, match="keys are stored as torch.int8, this cache stores "
                                         "torch.float8_e4m3fn"):
        FrameBuffer.from_state(state, "keys", TOKENS, torch.float32, torch.float8_e4m3fn)
    del state["keys_scale"]
    with pytest.raises(ValueError, match="keys_scale must be present"):
        FrameBuffer.from_state(state, "keys", TOKENS, torch.float32, torch.int8)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cache_dtype", "float16", "cache_dtype must be None .* or one of"),
        ("position_overflow", "wrap", "position_overflow must be one of"),
    ],
)
def test_unknown_cache_options_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        MemFlowConfig.reference(**{field: value})
