"""Sparse Memory Activation: per-head top-k routing over sink + bank frames (architecture s.4)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memflow_adapter.attention import attention
from memflow_adapter.policies import SparseMemoryActivation
from memflow_adapter.sparse import (
    SparseKeySet,
    gather_frames_per_head,
    select_memory_frames,
    sparse_memory_attention,
)

T = 5  # tokens per frame
SMA = SparseMemoryActivation()


def dense_reference(query, keys, values, mask=None):
    """softmax(q k^T / sqrt(D)) v in float64, with an optional boolean [B, H, Sq|1, Sk] mask."""
    q, k, v = (x.double().transpose(1, 2) for x in (query, keys, values))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).float()


@settings(max_examples=25, deadline=None)
@given(
    candidates=st.integers(1, 6),
    extra_top_k=st.integers(0, 3),
    local_frames=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_sma_equals_dense_attention_when_nothing_is_pruned(
    candidates, extra_top_k, local_frames, seed
):
    g = torch.Generator().manual_seed(seed)
    b, h, d = 2, 3, 8
    query = torch.randn(b, 2 * T, h, d, generator=g)
    memory_k, memory_v = (torch.randn(b, candidates * T, h, d, generator=g) for _ in range(2))
    local_k, local_v = (torch.randn(b, local_frames * T, h, d, generator=g) for _ in range(2))

    selected = select_memory_frames(SMA, query, memory_k, T, top_k=candidates + extra_top_k)
    assert selected.tolist() == [[list(range(candidates))] * h] * b

    sparse = sparse_memory_attention(query, memory_k, memory_v, local_k, local_v, selected, T)
    dense = attention(query, torch.cat([memory_k, local_k], 1), torch.cat([memory_v, local_v], 1))
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def planted_queries_and_memory(aligned_frames_per_head: list[int], candidates: int = 6):
    """Memory frame f has keys along basis vector e_f; head h's queries point along
    e_{aligned_frames_per_head[h]}."""
    h, d = len(aligned_frames_per_head), 8
    memory_k = torch.zeros(1, candidates * T, h, d)
    for frame in range(candidates):
        memory_k[0, frame * T : (frame + 1) * T, :, frame] = 1.0
    query = torch.zeros(1, 3 * T, h, d)
    for head, frame in enumerate(aligned_frames_per_head):
        query[0, :, head, frame] = 1.0
        query[0, :, head, 7] = 0.1 * (head + 1)  # common direction, no frame has it
    return query, memory_k


def test_sma_picks_the_planted_relevant_frame_of_each_head():
    query, memory_k = planted_queries_and_memory([4, 1, 2])
    assert select_memory_frames(SMA, query, memory_k, T, top_k=1).tolist() == [[[4], [1], [2]]]


def test_sma_keeps_selected_frames_in_temporal_order():
    query, memory_k = planted_queries_and_memory([5, 0])
    # make frame 3 the second best for both heads
    memory_k[0, 3 * T : 4 * T, :, 5] = 0.5
    memory_k[0, 3 * T : 4 * T, :, 0] = 0.5
    assert select_memory_frames(SMA, query, memory_k, T, top_k=2).tolist() == [[[3, 5], [0, 3]]]


def test_pruned_attention_equals_dense_attention_masked_to_the_selected_frames(generator):
    b, h, d, candidates, local_frames = 2, 3, 8, 6, 2
    query = torch.randn(b, 3 * T, h, d, generator=generator)
    memory_k, memory_v = (
        torch.randn(b, candidates * T, h, d, generator=generator) for _ in range(2)
    )
    local_k, local_v = (
        torch.randn(b, local_frames * T, h, d, generator=generator) for _ in range(2)
    )
    selected = select_memory_frames(SMA, query, memory_k, T, top_k=2)

    keep_frame = torch.zeros(b, h, candidates, dtype=torch.bool)
    keep_frame.scatter_(2, selected, True)
    mask = torch.cat(
        [
            keep_frame.repeat_interleave(T, dim=2),
            torch.ones(b, h, local_frames * T, dtype=torch.bool),
        ],
        dim=2,
    )[:, :, None, :]
    expected = dense_reference(
        query, torch.cat([memory_k, local_k], 1), torch.cat([memory_v, local_v], 1), mask
    )
    sparse = sparse_memory_attention(query, memory_k, memory_v, local_k, local_v, selected, T)
    torch.testing.assert_close(sparse, expected, rtol=1e-5, atol=1e-5)


def test_the_reused_key_set_equals_the_concatenation_and_keeps_its_buffer(generator):
    """SMA's key set is gathered into one preallocated buffer per layer: the same tensors as
    ``cat([gathered memory, local])``, bit for bit, and the next pass reuses the buffer."""
    b, h, d, candidates, local_frames = 2, 3, 8, 6, 2
    query = torch.randn(b, 3 * T, h, d, generator=generator)
    memory_k, memory_v, local_k, local_v = (
        torch.randn(b, n * T, h, d, generator=generator)
        for n in (candidates, candidates, local_frames, local_frames)
    )
    selected = select_memory_frames(SMA, query, memory_k, T, top_k=2)
    key_set = SparseKeySet()
    reused = sparse_memory_attention(query, memory_k, memory_v, local_k, local_v, selected, T,
                                     key_set=key_set)
    fresh = sparse_memory_attention(query, memory_k, memory_v, local_k, local_v, selected, T)
    assert torch.equal(reused, fresh)
    buffer = key_set.keys.data_ptr()
    keys, _ = key_set.assemble(memory_k, memory_v, local_k[:, :T], local_v[:, :T], selected, T)
    assert key_set.keys.data_ptr() == buffer  # a smaller pass fits the same buffer
    gathered = gather_frames_per_head(memory_k, selected, T).transpose(1, 2)
    assert torch.equal(keys, torch.cat([gathered, local_k[:, :T]], dim=1))


def test_the_window_is_copied_into_the_key_set_once_until_it_is_released(generator):
    """The local tokens start with the cache's window, which changes once per chunk: after one
    pass has copied it, the next passes copy only their own tokens, until ``release_window``."""
    b, h, d, window = 1, 2, 8, 2
    memory_k, memory_v = (torch.randn(b, 4 * T, h, d, generator=generator) for _ in range(2))
    query = torch.randn(b, T, h, d, generator=generator)
    local = torch.randn(b, (window + 1) * T, h, d, generator=generator)
    selected = select_memory_frames(SMA, query, memory_k, T, top_k=2)
    key_set = SparseKeySet()
    first, _ = key_set.assemble(memory_k, memory_v, local, local, selected, T, window * T)
    assert torch.equal(first[:, 2 * T :], local)
    changed = local.clone()
    changed[:, : window * T] += 1.0  # the session promises the window did not change...
    changed[:, window * T :] += 2.0
    kept, _ = key_set.assemble(memory_k, memory_v, changed, changed, selected, T, window * T)
    assert torch.equal(kept[:, 2 * T : (2 + window) * T], local[:, : window * T])  # not copied
    assert torch.equal(kept[:, (2 + window) * T :], changed[:, window * T :])  # own tokens were
    key_set.release_window()  # ...until it says it did
    again, _ = key_set.assemble(memory_k, memory_v, changed, changed, selected, T, window * T)
    assert torch.equal(again[:, 2 * T :], changed)
