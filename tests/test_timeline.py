"""draw_memory_timeline: a readable PNG from a real session trace, and clear errors for misuse."""

import functools

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from memflow_adapter import ChunkMemory, MemFlowConfig, StreamingSession
from memflow_adapter.timeline import draw_memory_timeline

from streaming_helpers import BATCH, DIM, HEADS, TOKENS, coded_qkv, random_tokens, run_chunk

LAYERS, CHUNKS = 2, 12
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The colours of the chunk's own frames, the sink, the local window and the SMA rings.
OWN, SINK, WINDOW, ACTIVATED = (
    np.array(rgb) / 255
    for rgb in ((0xF2, 0x8E, 0x2B), (0x4E, 0x79, 0xA7), (0xA9, 0xCC, 0xE3), (0xD6, 0x27, 0x28))
)


@functools.cache
def trace_of(config: MemFlowConfig) -> list[ChunkMemory]:
    """The trace of a 12-chunk video of seeded random tokens (cached: traces are read only)."""
    generator = torch.Generator().manual_seed(0)
    tokens = [[random_tokens(generator, 3 * CHUNKS) for _ in range(3)] for _ in range(LAYERS)]
    text_keys = [torch.randn(BATCH, 6, HEADS, DIM, generator=generator) for _ in range(LAYERS)]

    def qkv(layer, start, count):
        return tuple(t[:, start * TOKENS : (start + count) * TOKENS] for t in tokens[layer])

    session = StreamingSession(config, num_layers=LAYERS, tokens_per_frame=TOKENS)
    for _ in range(CHUNKS):
        run_chunk(session, qkv, text_keys if config.nam else None, denoise_passes=1)
    return session.trace()


def read_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)[..., :3]


def has_colour(image: np.ndarray, rgb: np.ndarray) -> bool:
    return bool((np.abs(image - rgb).max(axis=-1) < 0.05).any())


@pytest.mark.parametrize("preset", ["reference_sma", "longlive"])
def test_draws_a_nonblank_png_of_a_real_trace(tmp_path, preset):
    config = MemFlowConfig.preset(preset)
    path = draw_memory_timeline(trace_of(config), config, tmp_path / "nested" / "timeline.png")
    assert path == tmp_path / "nested" / "timeline.png"
    image = read_png(path)
    assert image.shape[0] >= 400 and image.shape[1] >= 600
    assert image.min() < image.max()
    assert all(has_colour(image, region) for region in (OWN, SINK, WINDOW))
    # SMA activation rings appear exactly when the trace has activations.
    assert has_colour(image, ACTIVATED) == config.sma


def test_any_layer_batch_element_and_title_can_be_drawn(tmp_path):
    config = MemFlowConfig.reference_sma()
    trace = trace_of(config)
    first = read_png(draw_memory_timeline(trace, config, tmp_path / "a.png"))
    other = read_png(
        draw_memory_timeline(
            trace, config, str(tmp_path / "b.png"), layer=1, batch_index=1, title="layer 1, b 1"
        )
    )
    assert first.shape[2] == other.shape[2] == 3 and not np.array_equal(first, other)


def test_an_unbounded_window_and_a_single_chunk_are_drawn(tmp_path):
    config = MemFlowConfig.full_history()
    read_png(draw_memory_timeline(trace_of(config), config, tmp_path / "full.png"))
    reference = MemFlowConfig.reference()
    single = trace_of(reference)[:1]
    read_png(draw_memory_timeline(single, reference, tmp_path / "one.png", layer=7))


def test_an_empty_trace_is_refused(tmp_path):
    with pytest.raises(ValueError, match="trace must hold at least one chunk"):
        draw_memory_timeline([], MemFlowConfig.reference(), tmp_path / "t.png")


def test_a_layer_without_bank_data_is_refused(tmp_path):
    config = MemFlowConfig.reference_sma()
    with pytest.raises(ValueError, match=r"layer must be one of the trace's bank layers \[0, 1\]"):
        draw_memory_timeline(trace_of(config), config, tmp_path / "t.png", layer=LAYERS)


@pytest.mark.parametrize("batch_index", [BATCH, -1])
def test_a_batch_index_outside_the_batch_is_refused(tmp_path, batch_index):
    config = MemFlowConfig.reference_sma()
    with pytest.raises(ValueError, match=rf"batch_index must be in 0..{BATCH - 1}"):
        draw_memory_timeline(trace_of(config), config, tmp_path / "t.png", batch_index=batch_index)


def test_a_negative_batch_index_is_refused_when_the_trace_records_no_batch(tmp_path):
    trace = [ChunkMemory(chunk_index=0, start_frame=0, bank={}, activated={})]
    with pytest.raises(ValueError, match="batch_index must be >= 0, got -1"):
        draw_memory_timeline(trace, MemFlowConfig.longlive(), tmp_path / "t.png", batch_index=-1)
    assert not (tmp_path / "t.png").exists()


def test_prompt_switches_are_marked_before_their_chunks(tmp_path):
    config = MemFlowConfig.longlive(frames_per_chunk=1, local_frames=3, sink_frames=1)
    session = StreamingSession(config, num_layers=1, tokens_per_frame=4)
    for _ in range(6):
        run_chunk(session, coded_qkv)
    plain = draw_memory_timeline(session.trace(), config, tmp_path / "plain.png")
    marked = draw_memory_timeline(session.trace(), config, tmp_path / "marked.png",
                                  prompt_switches=[2, 4])
    def green_pixels(path):  # the switch lines are the figure's only green
        red, green, blue = np.moveaxis(imread(path)[..., :3], -1, 0)
        return int(((green > red + 0.15) & (green > blue + 0.15)).sum())

    assert green_pixels(plain) == 0 and green_pixels(marked) > 100
