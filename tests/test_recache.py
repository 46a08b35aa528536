"""What a recache pass attends to (architecture s.4b, the published semantics).

A probe makes attention readable: zero queries make every attended key weigh the same, and each
frame's values are one-hot in a channel that names the frame and the pass that wrote it (channel
``f`` for frame ``f`` as a context pass cached it, ``RECACHED + f`` as the recache pass re-encodes
it). A query's output is then the share of every frame version it attended to.
"""

import itertools
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memflow_adapter import MemFlowConfig, StreamingSession

TOKENS, HEADS, DIM = 2, 2, 96
RECACHED = 48  # channel offset of the recache pass's own frames


def probe(start: int, num_frames: int, channel_offset: int, generator: torch.Generator):
    """Zero queries, random keys, one-hot values: ``[1, n * T, H, D]`` each."""
    frames = torch.arange(start, start + num_frames).repeat_interleave(TOKENS)
    values = torch.nn.functional.one_hot(frames + channel_offset, DIM).float()
    values = values[None, :, None, :].expand(1, -1, HEADS, -1).contiguous()
    keys = torch.randn(1, num_frames * TOKENS, HEADS, DIM, generator=generator)
    return torch.zeros_like(keys), keys, values


def shares(output: torch.Tensor, head: int) -> dict[int, float]:
    """The attended frame versions of the pass's first query and their weights."""
    row = output[0, 0, head]
    return {channel: round(float(row[channel]), 6) for channel in row.nonzero().flatten().tolist()}


def expected_shares(attended: list[int]) -> dict[int, float]:
    counts = Counter(attended)
    return {channel: round(n / len(attended), 6) for channel, n in sorted(counts.items())}


def recache_after(config: MemFlowConfig, chunks: int, seed: int = 0):
    """Stream ``chunks`` chunks of probe tokens, open the next chunk and run its recache pass.

    Returns the recache output, the window, and what the cache held before the pass: the sink
    count, the bank's frames, and per head the frames SMA activated in the pass (``None``
    without SMA).
    """
    g = torch.Generator().manual_seed(seed)
    session = StreamingSession(config, num_layers=1, tokens_per_frame=TOKENS)
    text_keys = [torch.randn(1, 5, HEADS, DIM, generator=g)] if config.nam else None
    for _ in range(chunks):
        start = session.next_frame
        session.begin_chunk(text_keys)
        with session.context_pass():
            session.attend(0, *probe(start, config.frames_per_chunk, 0, g))
    session.begin_chunk(text_keys)
    cache = session.layers[0]
    bank = [] if cache.bank_frame_index is None else cache.bank_frame_index[0, : cache.bank_filled]
    before = {"sink": cache.sink_count, "bank": [int(f) for f in bank]}
    with session.switch_prompt() as window:
        output = session.attend(0, *probe(window.start_frame, window.num_frames, RECACHED, g))
    passes = session.trace()[-1].activated.get(0, [])
    recache = [p.frames[0] for p in passes if p.kind == "recache"]
    before["activated"] = recache[0] if recache else None
    return output, window, before


def test_a_recache_with_a_protected_sink_does_not_attend_to_the_frames_it_drops():
    """7 chunks of 3 frames, LongLive: the window 9..20 is re-encoded, 9..11 only to be dropped.
    The recache attends to the sink 0..2 (as cached) and the kept frames 12..20 (re-encoded)."""
    output, window, _ = recache_after(MemFlowConfig.longlive(), chunks=7)
    assert (window.start_frame, window.stop_frame, window.protect_sink) == (9, 21, True)
    attended = [0, 1, 2, *(RECACHED + f for f in range(12, 21))]
    for head in range(HEADS):
        assert shares(output, head) == expected_shares(attended)  # 12 frames, 1/12 each


def test_sma_in_a_recache_that_re_encodes_the_sink_routes_over_sink_and_bank():
    """3 chunks, MemFlow+SMA: the window 0..8 is re-encoded with the sink. The candidates are the
    re-encoded sink 0..2 and the bank (frame 6, as cached); SMA's top 3 of them are attended,
    plus the re-encoded frames 3..8."""
    output, window, before = recache_after(MemFlowConfig.reference_sma(), chunks=3)
    assert (window.start_frame, window.stop_frame, window.protect_sink) == (0, 9, False)
    assert before["bank"] == [6]
    for head in range(HEADS):
        activated = before["activated"][head]
        assert len(activated) == 3 and set(activated) <= {0, 1, 2, 6}
        memory = [RECACHED + f if f < 3 else f for f in activated]
        assert shares(output, head) == expected_shares(
            [*memory, *(RECACHED + f for f in range(3, 9))]
        )


LAYOUTS = {
    "longlive": MemFlowConfig.longlive(),
    "reference": MemFlowConfig.reference(),
    "reference_sma": MemFlowConfig.reference_sma(),
    "small_sma": MemFlowConfig.reference_sma(
        sink_frames=1, bank_frames=2, local_frames=3, frames_per_chunk=2, record_interval=1,
        sma_top_k=2,
    ),
    "two_frame_sink": MemFlowConfig.reference(
        sink_frames=2, bank_frames=4, local_frames=4, frames_per_chunk=2, record_interval=1
    ),
}


@settings(max_examples=60, deadline=None)
@given(layout=st.sampled_from(sorted(LAYOUTS)), chunks=st.integers(1, 12), seed=st.integers(0, 99))
def test_a_recache_attends_to_the_memory_and_the_recached_frames_that_stay(layout, chunks, seed):
    """Wherever the window is: sink (or SMA's pick), bank (or SMA's pick) and the recached frames
    that stay in the cache; never a frame the pass drops."""
    config = LAYOUTS[layout]
    output, window, before = recache_after(config, chunks, seed)
    sink, bank = list(range(before["sink"])), before["bank"]
    if window.protect_sink:  # the sink is memory as cached; the frames on its slots are dropped
        memory = [[f] for f in sink] + [[f] for f in bank]
        own = range(window.stop_frame - config.local_frames, window.stop_frame)
    elif config.sma:  # the sink is re-encoded here and is memory with the bank
        memory = [[RECACHED + f] for f in sink] + [[f] for f in bank]
        own = range(before["sink"], window.stop_frame)
    else:  # the sink is re-encoded here, among all the recached frames
        memory = [[f] for f in bank]
        own = range(window.stop_frame)
    for head in range(HEADS):
        if config.sma and memory:
            picked = before["activated"][head]
            assert len(picked) == min(config.sma_top_k, len(memory))
            # a frame both in the sink and in the bank may stand for either version
            versions = {f: [v for c in memory for v in c if v % RECACHED == f] for f in picked}
            options = itertools.product(*(versions[f] for f in picked))
        else:
            options = [[v for c in memory for v in c]]
        got = shares(output, head)
        own_versions = [RECACHED + f for f in own]
        assert any(got == expected_shares([*chosen, *own_versions]) for chosen in options)


def test_passes_other_than_the_recache_are_unchanged():
    """Pinned: a denoising pass after a recache still attends to [sink | bank | window | own]."""
    config = MemFlowConfig.reference()
    g = torch.Generator().manual_seed(0)
    session = StreamingSession(config, num_layers=1, tokens_per_frame=TOKENS)
    text_keys = [torch.randn(1, 5, HEADS, DIM, generator=g)]
    for _ in range(7):
        start = session.next_frame
        session.begin_chunk(text_keys)
        with session.context_pass():
            session.attend(0, *probe(start, 3, 0, g))
    session.begin_chunk(text_keys)
    bank = session.layers[0].bank_frame_index[0].tolist()
    with session.switch_prompt() as window:
        session.attend(0, *probe(window.start_frame, window.num_frames, RECACHED, g))
    with session.denoise_pass():
        output = session.attend(0, *probe(21, 3, 0, g))
    recached_window = [RECACHED + f for f in range(15, 21)]
    attended = [0, 1, 2, *bank, *recached_window, 21, 22, 23]
    assert shares(output, 0) == expected_shares(attended)


@pytest.mark.parametrize("chunks", [1, 3, 4])
def test_a_recache_of_a_video_inside_the_window_attends_to_all_of_it(chunks):
    """Without SMA and with nothing dropped, every recached frame and the bank are attended."""
    output, window, before = recache_after(MemFlowConfig.reference(), chunks)
    assert not window.protect_sink
    attended = [*before["bank"], *(RECACHED + f for f in range(window.stop_frame))]
    assert shares(output, 0) == expected_shares(attended)


def bank_filling(config: MemFlowConfig, chunks: int) -> list[list[int]]:
    """The bank's frames at the start of each of ``chunks`` chunks (probe tokens, random text)."""
    g = torch.Generator().manual_seed(0)
    session = StreamingSession(config, num_layers=1, tokens_per_frame=TOKENS)
    text_keys = [torch.randn(1, 5, HEADS, DIM, generator=g)]
    for _ in range(chunks):
        start = session.next_frame
        session.begin_chunk(text_keys)
        with session.context_pass():
            session.attend(0, *probe(start, config.frames_per_chunk, 0, g))
    return [chunk.bank.get(0, [[]])[0] for chunk in session.trace()]


def test_interval_staging_fills_the_bank_with_the_first_frames_of_every_third_chunk():
    """The published interactive pipeline's cadence (record_interval 3, 3-frame chunks): chunks
    0, 3, 6 stage their first frames, so the bank fills with latent frames 0, 9, 18 in staging
    order; the causal default fills it with 6, 15, 24. From then on both select with NAM: each
    later commit keeps 2 of the bank and appends the newest staged frame."""
    interval = bank_filling(MemFlowConfig.reference(bank_staging="interval"), 13)
    assert interval[:8] == [[], [0], [0], [0], [0, 9], [0, 9], [0, 9], [0, 9, 18]]
    assert interval[9] == [0, 9, 18]
    assert interval[10][-1] == 27 and set(interval[10][:2]) <= {0, 9, 18}
    assert interval[12] == interval[11] == interval[10]  # chunks 10, 11 staged nothing
    default = bank_filling(MemFlowConfig.reference(), 13)
    assert default[3] == [6] and default[6] == [6, 15] and default[9] == [6, 15, 24]
    assert default[10][-1] == 27 and default[12][-1] == 33


def test_bank_staging_must_be_a_known_cadence():
    expected = r"bank_staging must be one of \['every_chunk', 'interval'\], got 'sometimes'"
    with pytest.raises(ValueError, match=expected):
        MemFlowConfig(bank_staging="sometimes")
