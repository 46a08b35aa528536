"""Narrative Adaptive Memory: the slot pointer, the scores and the bank refresh
(architecture s.3)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memflow_adapter import MemFlowConfig, StreamingSession
from memflow_adapter.cache import LayerCache
from memflow_adapter.memory import bank_slot_for_commit, update_bank
from memflow_adapter.policies import NarrativeAdaptiveMemory, nam_scores

from streaming_helpers import BATCH, DIM, HEADS, TOKENS, coded_qkv, frame_coded, run_chunk

TEXT_KEYS = [torch.ones(BATCH, 5, HEADS, DIM)]


def bank_after_each_chunk(config: MemFlowConfig, num_chunks: int) -> list[list[int]]:
    """Frames the bank holds (layer 0, batch element 0) while each chunk is generated."""
    session = StreamingSession(config, num_layers=1, tokens_per_frame=TOKENS)
    for _ in range(num_chunks):
        run_chunk(session, coded_qkv, TEXT_KEYS)
    return [chunk.bank[0][0] if chunk.bank else [] for chunk in session.trace()]


def test_slot_pointer_with_record_interval_3_keeps_chunks_2_5_8():
    # The commit at the start of chunk c places chunk c-1's first frame.
    slots = [bank_slot_for_commit(c, record_interval=3, bank_frames=3) for c in range(1, 12)]
    assert slots == [0, 0, 0, 1, 1, 1, 2, 2, 2, None, None]


def test_slot_pointer_needs_a_committed_chunk():
    with pytest.raises(ValueError, match="chunk_index must be >= 1"):
        bank_slot_for_commit(0, 3, 3)


def test_scripted_bank_filling_with_record_interval_3():
    banks = bank_after_each_chunk(MemFlowConfig.reference(record_interval=3), num_chunks=10)
    assert banks == [
        [],  # chunk 0: nothing committed yet
        [0],
        [3],
        [6],  # slot 0 receives chunks 0, 1, 2 and keeps chunk 2's frame 6
        [6, 9],
        [6, 12],
        [6, 15],
        [6, 15, 18],
        [6, 15, 21],
        [6, 15, 24],  # the bank ends at frames 6, 15, 24
    ]


def test_scripted_bank_filling_with_record_interval_1():
    banks = bank_after_each_chunk(MemFlowConfig.reference(record_interval=1), num_chunks=4)
    assert banks == [[], [0], [0, 3], [0, 3, 6]]


@settings(max_examples=40, deadline=None)
@given(
    bank=st.integers(1, 4),
    interval=st.integers(1, 4),
    chunk=st.integers(1, 3),
    num_chunks=st.integers(1, 14),
)
def test_bank_never_exceeds_its_size_and_always_holds_the_newest_candidate_once_full(
    bank, interval, chunk, num_chunks
):
    config = MemFlowConfig.reference(
        bank_frames=bank, record_interval=interval, frames_per_chunk=chunk, local_frames=chunk + 2
    )
    session = StreamingSession(config, num_layers=1, tokens_per_frame=TOKENS)
    first_frames = []
    for chunk_index in range(num_chunks):
        first_frames.append(session.next_frame)
        run_chunk(session, coded_qkv, TEXT_KEYS)
        cache = session.layers[0]
        # the candidate is always the newest committed chunk's first frame
        assert cache.staged_frame == first_frames[-1]
        assert cache.staged_keys.codes[0, :, 0, 0].tolist() == [first_frames[-1]] * TOKENS
        held = cache.bank_frame_index[:, : cache.bank_filled]
        assert cache.bank_filled <= bank
        assert set(held.flatten().tolist()) <= set(first_frames[:-1])
        # stored keys are those of the frames the index names
        bank_keys = cache.bank_by_frame()[:, :, 0, 0, 0]
        assert torch.equal(bank_keys, held.float())
        if chunk_index >= 1 and bank_slot_for_commit(chunk_index, interval, bank) is None:
            assert held[:, -1].tolist() == [first_frames[-2]] * BATCH


def test_scores_are_the_mean_scaled_dot_product_over_text_tokens_heads_and_frame_tokens(generator):
    text_keys = torch.randn(2, 7, 3, 16, generator=generator)
    frame_keys = torch.randn(2, 5, 6, 3, 16, generator=generator)
    explicit = torch.einsum("blhd,bfthd->bflht", text_keys, frame_keys) / math.sqrt(16)
    expected = explicit.mean(dim=(2, 3, 4))
    torch.testing.assert_close(nam_scores(text_keys, frame_keys), expected, rtol=1e-5, atol=1e-6)


def test_scores_reject_mismatched_heads():
    with pytest.raises(ValueError, match="do not match frame_keys"):
        nam_scores(torch.zeros(1, 4, 2, 8), torch.zeros(1, 3, 4, 3, 8))


def planted_bank(aligned_slot_per_batch: list[int]) -> LayerCache:
    """A full 2-slot bank per batch element: one frame aligned with the text direction e0, the
    other orthogonal (e1), and a staged candidate."""
    config = MemFlowConfig.reference(bank_frames=2, record_interval=1)
    cache = LayerCache(config, TOKENS)
    aligned = torch.zeros(DIM)
    aligned[0] = 1.0
    orthogonal = torch.zeros(DIM)
    orthogonal[1] = 1.0
    for slot in range(2):
        keys = torch.stack(
            [
                (aligned if aligned_slot_per_batch[b] == slot else orthogonal).expand(
                    TOKENS, HEADS, DIM
                )
                for b in range(BATCH)
            ]
        )
        cache.stage(keys, keys, frame=10 * (slot + 1))
        cache.commit_staged_to_slot(slot)
    staged = frame_coded(30, 1)
    cache.stage(staged, staged, frame=30)
    return cache


def test_a_frame_aligned_with_the_prompt_is_kept_and_an_orthogonal_one_dropped():
    cache = planted_bank(aligned_slot_per_batch=[0, 1])  # frame 10 aligned in b0, frame 20 in b1
    text_keys = torch.zeros(BATCH, 5, HEADS, DIM)
    text_keys[..., 0] = 1.0
    update_bank(cache, commit_index=5, policy=NarrativeAdaptiveMemory(), text_keys=text_keys)
    assert cache.bank_frame_index.tolist() == [[10, 30], [20, 30]]
    kept_keys = cache.bank_by_frame()[:, 0, 0, 0]  # [B, D] of the kept slot
    assert kept_keys[:, 0].tolist() == [1.0, 1.0]


def test_selection_needs_the_prompt_keys():
    cache = planted_bank(aligned_slot_per_batch=[0, 0])
    with pytest.raises(ValueError, match="text_keys are required"):
        update_bank(cache, commit_index=5, policy=NarrativeAdaptiveMemory(), text_keys=None)
