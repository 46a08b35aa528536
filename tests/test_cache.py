"""LayerCache: the sink, the local window and its eviction, the staging slot, views."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memflow_adapter import MemFlowConfig
from memflow_adapter.cache import LayerCache

from streaming_helpers import HEADS, TOKENS, frame_coded, frames_of


def commit_chunks(cache: LayerCache, chunk_sizes: list[int]) -> None:
    for size in chunk_sizes:
        tokens = frame_coded(cache.frames_written, size)
        cache.append(tokens, tokens, cache.frames_written)


@settings(max_examples=60, deadline=None)
@given(
    sink=st.integers(0, 4),
    chunk=st.integers(1, 4),
    extra_local=st.integers(0, 6),
    num_chunks=st.integers(1, 12),
)
def test_eviction_keeps_the_sink_and_the_newest_local_frames(sink, chunk, extra_local, num_chunks):
    config = MemFlowConfig.longlive(
        sink_frames=sink, frames_per_chunk=chunk, local_frames=chunk + extra_local
    )
    cache = LayerCache(config, TOKENS)
    commit_chunks(cache, [chunk] * num_chunks)

    written = chunk * num_chunks
    sink_frames = list(range(min(sink, written)))
    past_frames = list(range(len(sink_frames), written))
    window_frames = past_frames[len(past_frames) - min(extra_local, len(past_frames)) :]
    keys, values = cache.context()
    assert frames_of(keys) == sink_frames + window_frames
    assert frames_of(values) == sink_frames + window_frames
    assert list(cache.window_frames) == window_frames


def test_unbounded_window_grows_and_keeps_every_frame():
    cache = LayerCache(MemFlowConfig.full_history(), TOKENS)
    commit_chunks(cache, [3] * 7)
    keys, _ = cache.context()
    assert frames_of(keys) == list(range(21))
    assert cache.window_capacity >= 21


def test_a_full_context_is_a_view_of_the_buffer_not_a_copy():
    cache = LayerCache(MemFlowConfig.reference(), TOKENS)
    commit_chunks(cache, [3] * 4)
    for slot in range(3):
        cache.stage(frame_coded(100 + slot, 1), frame_coded(100 + slot, 1), 100 + slot)
        cache.commit_staged_to_slot(slot)
    keys, _ = cache.context()
    assert keys.data_ptr() == cache.keys.codes.data_ptr()
    assert frames_of(keys) == [0, 1, 2, 100, 101, 102, 6, 7, 8, 9, 10, 11]


def test_a_partly_filled_context_skips_empty_slots():
    cache = LayerCache(MemFlowConfig.reference(), TOKENS)
    commit_chunks(cache, [3, 3])
    cache.stage(frame_coded(3, 1), frame_coded(3, 1), 3)
    cache.commit_staged_to_slot(0)
    keys, _ = cache.context()
    assert frames_of(keys) == [0, 1, 2, 3, 3, 4, 5]
    memory_keys, _, memory_frames = cache.memory()
    assert frames_of(memory_keys) == [0, 1, 2, 3]
    assert memory_frames.tolist() == [[0, 1, 2, 3]] * 2
    assert cache.memory(include_sink=False)[2].tolist() == [[3]] * 2


def test_staging_replaces_the_previous_candidate_and_commit_clears_it():
    cache = LayerCache(MemFlowConfig.reference(), TOKENS)
    cache.stage(frame_coded(0, 1), frame_coded(0, 1), 0)
    cache.stage(frame_coded(3, 1), frame_coded(3, 1), 3)
    assert cache.staged_frame == 3 and frames_of(cache.staged_keys.codes) == [3]
    cache.commit_staged_to_slot(1)
    assert cache.staged_frame == -1
    assert cache.bank_frame_index.tolist() == [[-1, 3, -1]] * 2
    with pytest.raises(RuntimeError, match="no staged frame"):
        cache.commit_staged_to_slot(0)


def test_overwrite_with_a_protected_sink_rewrites_only_the_window():
    cache = LayerCache(MemFlowConfig.longlive(), TOKENS)
    commit_chunks(cache, [3] * 6)  # frames 0..17; window holds 12..17
    new = frame_coded(1000, 12)  # a recache pass over frames 6..17
    cache.overwrite(new, new, start_frame=6, protect_sink=True)
    keys, _ = cache.context()
    assert frames_of(keys) == [0, 1, 2] + list(range(1006, 1012))


def test_overwrite_of_a_short_video_re_encodes_the_sink_too():
    cache = LayerCache(MemFlowConfig.longlive(), TOKENS)
    commit_chunks(cache, [3, 3])  # frames 0..5; sink 0..2, window 3..5
    new = frame_coded(500, 6)
    cache.overwrite(new, new, start_frame=0, protect_sink=False)
    keys, _ = cache.context()
    assert frames_of(keys) == [500, 501, 502, 503, 504, 505]


def test_overwrite_must_end_at_the_newest_frame():
    cache = LayerCache(MemFlowConfig.longlive(), TOKENS)
    commit_chunks(cache, [3, 3])
    tokens = frame_coded(0, 3)
    with pytest.raises(ValueError, match=r"must cover frames \[start_frame, 6\)"):
        cache.overwrite(tokens, tokens, start_frame=0, protect_sink=False)


def test_chunks_must_arrive_in_order():
    cache = LayerCache(MemFlowConfig.longlive(), TOKENS)
    tokens = frame_coded(3, 3)
    with pytest.raises(ValueError, match="start_frame must be 0"):
        cache.append(tokens, tokens, 3)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (torch.zeros(2, 12, HEADS), r"keys must be \[batch, frames \* tokens_per_frame"),
        (torch.zeros(2, 10, HEADS, 8), "not a whole number of frames"),
    ],
)
def test_bad_shapes_are_rejected(tokens, message):
    cache = LayerCache(MemFlowConfig.longlive(), TOKENS)
    with pytest.raises(ValueError, match=message):
        cache.append(tokens, tokens, 0)


def test_a_write_with_another_geometry_is_rejected_and_changes_nothing():
    cache = LayerCache(MemFlowConfig.longlive(), TOKENS)
    commit_chunks(cache, [3])
    before = cache.keys.codes.clone()
    other = torch.zeros(2, 3 * TOKENS, HEADS + 1, 8)
    with pytest.raises(ValueError, match="do not match this cache"):
        cache.append(other, other, 3)
    assert torch.equal(cache.keys.codes, before) and cache.frames_written == 3


def test_values_must_match_keys():
    cache = LayerCache(MemFlowConfig.longlive(), TOKENS)
    with pytest.raises(ValueError, match="values must have the keys' shape"):
        cache.append(frame_coded(0, 3), frame_coded(0, 2), 0)


def test_tokens_per_frame_is_validated():
    with pytest.raises(ValueError, match="tokens_per_frame must be >= 1, got 0"):
        LayerCache(MemFlowConfig.reference(), 0)


def test_reset_frees_every_tensor():
    cache = LayerCache(MemFlowConfig.reference(), TOKENS)
    commit_chunks(cache, [3, 3])
    cache.stage(frame_coded(3, 1), frame_coded(3, 1), 3)
    cache.reset()
    assert cache.keys is None and cache.values is None and cache.staged_keys is None
    assert cache.frames_written == 0 and cache.bank_filled == 0 and cache.staged_frame == -1


# ------------------------------------------------------------------- copy-free key sets (issue 21)
def shares_storage(tensor: torch.Tensor, buffer_codes: torch.Tensor) -> bool:
    return tensor.untyped_storage().data_ptr() == buffer_codes.untyped_storage().data_ptr()


def full_reference_cache(cache_dtype=None) -> LayerCache:
    """Sink 3, bank 3 (filled), window 6: every region full after 5 chunks."""
    cache = LayerCache(MemFlowConfig.reference(cache_dtype=cache_dtype), TOKENS)
    commit_chunks(cache, [3] * 5)
    for slot in range(3):
        cache.stage(frame_coded(100 + slot, 1), frame_coded(100 + slot, 1), 100 + slot)
        cache.commit_staged_to_slot(slot)
    return cache


def test_a_full_caches_key_set_with_the_pass_is_one_view_of_its_buffer_in_order():
    cache = full_reference_cache()
    own = frame_coded(15, 3)
    keys, values = cache.context_with(own, own)
    assert shares_storage(keys, cache.keys.codes) and shares_storage(values, cache.values.codes)
    assert frames_of(keys) == [0, 1, 2, 100, 101, 102, *range(9, 15), 15, 16, 17]
    context_keys, _ = cache.context()
    assert torch.equal(keys, torch.cat([context_keys, own], dim=1))
    window_keys, _ = cache.window_with(own, own)
    assert shares_storage(window_keys, cache.keys.codes)
    assert frames_of(window_keys) == [*range(9, 15), 15, 16, 17]


def test_the_pass_slot_is_scratch_it_changes_no_cached_frame_and_is_not_saved():
    cache = full_reference_cache()
    before = cache.state_dict()
    cache.context_with(frame_coded(15, 3), frame_coded(15, 3))
    after = cache.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert cache.pass_nbytes == 2 * frame_coded(0, 3).nbytes  # one chunk of keys and values
    restored = LayerCache(cache.config, TOKENS)
    restored.load_state_dict(after)
    assert restored.pass_frames == 3
    assert torch.equal(restored.context_with(frame_coded(15, 3), frame_coded(15, 3))[0],
                       cache.context_with(frame_coded(15, 3), frame_coded(15, 3))[0])


def test_before_the_bank_fills_and_when_gradients_flow_the_key_set_is_concatenated():
    cache = LayerCache(MemFlowConfig.reference(), TOKENS)
    commit_chunks(cache, [3] * 5)  # bank empty: sink and window are not adjacent
    own = frame_coded(15, 3)
    keys, _ = cache.context_with(own, own)
    assert not shares_storage(keys, cache.keys.codes)
    assert frames_of(keys) == [0, 1, 2, *range(9, 15), 15, 16, 17]
    full = full_reference_cache()
    trained = own.clone().requires_grad_()
    keys, _ = full.context_with(trained, trained)
    keys.sum().backward()
    assert torch.equal(trained.grad, torch.ones_like(own))  # the gradient reaches the own K/V


def test_a_quantized_cache_has_no_pass_slot_its_own_kv_stay_exact():
    cache = full_reference_cache("int8")
    own = frame_coded(15, 3) + 0.1
    keys, _ = cache.context_with(own, own)
    assert cache.pass_frames == 0 and cache.pass_nbytes == 0
    assert torch.equal(keys[:, -3 * TOKENS :], own)
