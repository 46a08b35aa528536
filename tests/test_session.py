"""StreamingSession: the chunk lifecycle, exactness of streaming attention, the recache, the trace,
save/restore, and the errors for misuse."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from memflow_adapter import MemFlowConfig, SessionStateError, StreamingSession
from memflow_adapter.attention import attention

from streaming_helpers import (
    BATCH,
    DIM,
    HEADS,
    TOKENS,
    coded_qkv,
    frame_coded,
    frames_of,
    random_tokens,
    run_chunk,
)

LAYERS = 2


def session_for(config: MemFlowConfig, layers: int = LAYERS) -> StreamingSession:
    return StreamingSession(config, num_layers=layers, tokens_per_frame=TOKENS)


def video_qkv(generator: torch.Generator, frames: int, layers: int = LAYERS):
    """Random per-layer q/k/v for a whole video, and a ``qkv`` callable slicing it by frame."""
    tensors = [[random_tokens(generator, frames) for _ in range(3)] for _ in range(layers)]

    def qkv(layer, start, count):
        return tuple(t[:, start * TOKENS : (start + count) * TOKENS] for t in tensors[layer])

    return tensors, qkv


def text_keys_for(generator: torch.Generator, layers: int = LAYERS):
    return [torch.randn(BATCH, 6, HEADS, DIM, generator=generator) for _ in range(layers)]


def chunk_mask(total_frames: int, attended_frames) -> torch.Tensor:
    """Boolean [Sq, Sk] token mask from ``attended_frames(query_frame) -> frames``."""
    mask = torch.zeros(total_frames, total_frames, dtype=torch.bool)
    for query_frame in range(total_frames):
        mask[query_frame, list(attended_frames(query_frame))] = True
    return mask.repeat_interleave(TOKENS, 0).repeat_interleave(TOKENS, 1)


def masked_attention(query, key, value, mask):
    q, k, v = (x.double().transpose(1, 2) for x in (query, key, value))
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).float()


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("denoise_passes", [0, 2])
def test_full_history_streaming_equals_block_causal_full_attention(generator, denoise_passes):
    chunk, chunks = 3, 6
    total = chunk * chunks
    tensors, qkv = video_qkv(generator, total)
    session = session_for(MemFlowConfig.full_history(frames_per_chunk=chunk))
    streamed = [run_chunk(session, qkv, denoise_passes=denoise_passes) for _ in range(chunks)]

    block_causal = chunk_mask(total, lambda f: range((f // chunk + 1) * chunk))
    for layer in range(LAYERS):
        expected = masked_attention(*tensors[layer], block_causal)
        got = torch.cat([outputs[layer] for outputs in streamed], dim=1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_longlive_streaming_equals_sink_plus_sliding_window_attention(generator):
    config = MemFlowConfig.longlive()  # sink 3, window 9 incl. the 3-frame chunk
    chunks = 7
    total = 3 * chunks
    tensors, qkv = video_qkv(generator, total)
    session = session_for(config)
    streamed = [run_chunk(session, qkv) for _ in range(chunks)]

    def attended(frame):
        chunk_start = frame // 3 * 3
        window_start = max(3, chunk_start - config.window_capacity)
        return [*range(min(3, chunk_start + 3)), *range(window_start, chunk_start + 3)]

    expected = masked_attention(*tensors[1], chunk_mask(total, attended))
    got = torch.cat([outputs[1] for outputs in streamed], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_memflow_chunks_attend_to_sink_then_bank_then_window_then_themselves(generator):
    session = session_for(MemFlowConfig.reference(), layers=1)
    text_keys = text_keys_for(generator, layers=1)
    for _ in range(5):
        run_chunk(session, coded_qkv, text_keys)
    # chunk 5 (frames 15..17): the bank holds chunk 2's and chunk 4's first frames
    session.begin_chunk(text_keys)
    query = random_tokens(generator, 3)
    own = frame_coded(15, 3)
    with session.denoise_pass():
        output = session.attend(0, query, own, own)
    context_frames = [0, 1, 2, 6, 12, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    keys = torch.cat([frame_coded(f, 1) for f in context_frames], dim=1)
    torch.testing.assert_close(output, attention(query, keys, keys), rtol=1e-5, atol=1e-5)


def test_sma_with_top_k_covering_every_candidate_equals_memflow_without_sma(generator):
    _, qkv = video_qkv(generator, 3 * 12)
    text_keys = text_keys_for(generator)
    dense = session_for(MemFlowConfig.reference())
    sparse = session_for(MemFlowConfig.reference_sma(sma_top_k=6))
    for _ in range(12):
        expected = run_chunk(dense, qkv, text_keys, denoise_passes=1)
        got = run_chunk(sparse, qkv, text_keys, denoise_passes=1)
        for layer in range(LAYERS):
            torch.testing.assert_close(got[layer], expected[layer], rtol=1e-5, atol=1e-5)


def test_denoise_passes_read_the_cache_and_write_nothing(generator):
    _, qkv = video_qkv(generator, 3 * 4)
    text_keys = text_keys_for(generator)
    session = session_for(MemFlowConfig.reference())
    for _ in range(3):
        run_chunk(session, qkv, text_keys)
    session.begin_chunk(text_keys)
    snapshot = [cache.state_dict() for cache in session.layers]
    for _ in range(3):
        with session.denoise_pass():
            for layer in range(LAYERS):
                session.attend(layer, *qkv(layer, 9, 3))
    for cache, before in zip(session.layers, snapshot, strict=True):
        after = cache.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[name], before[name]) for name in before)


# --------------------------------------------------------------------------------------- recache
def test_recache_of_a_video_that_fits_in_the_cache_re_encodes_the_sink_too():
    session = session_for(MemFlowConfig.longlive(), layers=1)
    for _ in range(3):
        run_chunk(session, coded_qkv)
    session.begin_chunk()
    with session.switch_prompt() as window:
        assert (window.start_frame, window.stop_frame, window.protect_sink) == (0, 9, False)
        new = frame_coded(100, 9)
        session.attend(0, new, new, new)
    keys, _ = session.layers[0].context()
    assert frames_of(keys) == [100, 101, 102, 103, 104, 105, 106, 107, 108]


def test_recache_of_a_long_video_protects_the_sink_and_keeps_the_bank(generator):
    session = session_for(MemFlowConfig.reference(), layers=1)
    text_keys = text_keys_for(generator, layers=1)
    for _ in range(10):  # 30 frames: longer than the 12-frame cache
        run_chunk(session, coded_qkv, text_keys)
    session.begin_chunk(text_keys)
    cache = session.layers[0]
    bank_before = cache.bank_frame_index.clone()
    memory_keys, memory_values, _ = cache.memory()
    with session.switch_prompt() as window:
        assert (window.start_frame, window.stop_frame, window.protect_sink) == (18, 30, True)
        query = random_tokens(generator, 12)
        new = frame_coded(1018, 12)
        output = session.attend(0, query, new, new)
    # the recache pass attends to sink + bank and, in both directions, to its own frames that
    # stay cached: 18..20 would land on the protected sink's slots, so they are no keys
    kept = new[:, 3 * TOKENS :]
    expected = attention(
        query, torch.cat([memory_keys, kept], 1), torch.cat([memory_values, kept], 1)
    )
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    # sink kept; frames 18..23 computed and discarded; the window's 24..29 rewritten
    keys, _ = cache.context()
    bank = bank_before[0].tolist()
    assert frames_of(keys) == [0, 1, 2, *bank, 1024, 1025, 1026, 1027, 1028, 1029]
    assert torch.equal(cache.bank_frame_index, bank_before)


def test_recache_pass_must_cover_the_window():
    session = session_for(MemFlowConfig.longlive(), layers=1)
    run_chunk(session, coded_qkv)
    session.begin_chunk()
    with (
        pytest.raises(ValueError, match=r"recache pass must cover 3 frames \(0..2\), got 2"),
        session.switch_prompt(),
    ):
        tokens = frame_coded(0, 2)
        session.attend(0, tokens, tokens, tokens)


def test_recache_needs_generated_frames_and_comes_before_any_pass():
    session = session_for(MemFlowConfig.longlive(), layers=1)
    session.begin_chunk()
    with pytest.raises(SessionStateError, match="nothing to recache"), session.switch_prompt():
        pass
    with session.context_pass():
        session.attend(0, *coded_qkv(0, 0, 3))
    session.begin_chunk()
    with session.denoise_pass():
        session.attend(0, *coded_qkv(0, 3, 3))
    with pytest.raises(SessionStateError, match="right after begin_chunk"), session.switch_prompt():
        pass


# ----------------------------------------------------------------------------------------- trace
def test_trace_reports_bank_frames_and_sma_activations_as_plain_data(generator):
    _, qkv = video_qkv(generator, 3 * 12)
    text_keys = text_keys_for(generator)
    session = session_for(MemFlowConfig.reference_sma())
    for _ in range(12):
        run_chunk(session, qkv, text_keys, denoise_passes=2)
    trace = session.trace()
    assert [chunk.start_frame for chunk in trace] == list(range(0, 36, 3))
    assert trace[0].bank == {} and trace[0].activated == {}
    assert trace[9].bank[0] == [[6, 15, 24]] * BATCH
    last = trace[11]
    for layer in range(LAYERS):
        passes = last.activated[layer]
        assert [p.kind for p in passes] == ["denoise", "denoise", "context"]
        for activation in passes:
            for b, heads in enumerate(activation.frames):
                candidates = {0, 1, 2, *last.bank[layer][b]}
                for frames in heads:
                    assert len(frames) == 3 and frames == sorted(frames)
                    assert set(frames) <= candidates


# ---------------------------------------------------------------------------------- save/restore
def test_a_paused_and_resumed_generation_is_bit_identical(generator, tmp_path):
    _, qkv = video_qkv(generator, 3 * 14)
    first_prompt, second_prompt = text_keys_for(generator), text_keys_for(generator)
    config = MemFlowConfig.reference_sma()

    def continue_video(session):
        outputs = []
        for index in range(6):
            prompt = first_prompt if index < 3 else second_prompt
            if index == 3:
                session.begin_chunk(prompt)
                with session.switch_prompt() as window:
                    for layer in range(LAYERS):
                        session.attend(layer, *qkv(layer, window.start_frame, window.num_frames))
                with session.context_pass():
                    outputs += [
                        session.attend(layer, *qkv(layer, session.next_frame, 3))
                        for layer in range(LAYERS)
                    ]
            else:
                outputs += run_chunk(session, qkv, prompt, denoise_passes=1)
        return outputs

    original = session_for(config)
    for _ in range(8):
        run_chunk(original, qkv, first_prompt, denoise_passes=1)
    save_file(original.state_dict(), tmp_path / "session.safetensors")
    uninterrupted = continue_video(original)

    resumed = session_for(config)
    resumed.load_state_dict(load_file(tmp_path / "session.safetensors"))
    for expected, got in zip(uninterrupted, continue_video(resumed), strict=True):
        assert torch.equal(expected, got)


def test_state_of_another_config_is_refused_and_nothing_changes(generator):
    session = session_for(MemFlowConfig.reference())
    text_keys = text_keys_for(generator)
    run_chunk(session, coded_qkv, text_keys)
    state = session.state_dict()
    other = session_for(MemFlowConfig.longlive())
    run_chunk(other, coded_qkv)
    with pytest.raises(ValueError, match="saved with config"):
        other.load_state_dict(state)
    assert other.next_frame == 3 and other.layers[0].frames_written == 3


def test_state_of_another_geometry_is_refused():
    state = session_for(MemFlowConfig.longlive()).state_dict()
    with pytest.raises(ValueError, match="num_layers=2, this session has 3"):
        session_for(MemFlowConfig.longlive(), layers=3).load_state_dict(state)
    with pytest.raises(KeyError, match="missing"):
        session_for(MemFlowConfig.longlive()).load_state_dict({})


def test_reset_frees_every_cache_and_forgets_the_video(generator):
    session = session_for(MemFlowConfig.reference_sma())
    text_keys = text_keys_for(generator)
    for _ in range(4):
        run_chunk(session, coded_qkv, text_keys)
    session.reset()
    assert session.chunk_index == 0 and session.next_frame == 0 and session.trace() == []
    assert all(cache.keys is None and cache.staged_keys is None for cache in session.layers)


# -------------------------------------------------------------------------------- misuse errors
def test_attend_outside_a_pass_is_an_error():
    session = session_for(MemFlowConfig.longlive())
    with pytest.raises(SessionStateError, match="outside a pass"):
        session.attend(0, *coded_qkv(0, 0, 3))


def test_passes_need_an_open_chunk_and_chunks_need_a_context_pass():
    session = session_for(MemFlowConfig.longlive())
    with pytest.raises(SessionStateError, match="call begin_chunk first"), session.denoise_pass():
        pass
    session.begin_chunk()
    with pytest.raises(SessionStateError, match="still open"):
        session.begin_chunk()
    with pytest.raises(SessionStateError, match="only available between chunks"):
        session.state_dict()


def test_passes_do_not_nest_and_each_layer_attends_once_per_pass():
    session = session_for(MemFlowConfig.longlive())
    session.begin_chunk()
    with session.denoise_pass():
        with pytest.raises(SessionStateError, match="already running"), session.denoise_pass():
            pass
        session.attend(0, *coded_qkv(0, 0, 3))
        with pytest.raises(SessionStateError, match="layer 0 attended twice"):
            session.attend(0, *coded_qkv(0, 0, 3))


def test_a_context_pass_that_skips_a_layer_commits_nothing_and_the_chunk_stays_open():
    session = session_for(MemFlowConfig.longlive())
    session.begin_chunk()
    before = [cache.state_dict() for cache in session.layers]
    with (
        pytest.raises(SessionStateError, match=r"without layers \[1\] attending"),
        session.context_pass(),
    ):
        session.attend(0, *coded_qkv(0, 0, 3))
    assert session.next_frame == 0
    assert [cache.state_dict().keys() for cache in session.layers] == [
        state.keys() for state in before
    ]
    with session.context_pass():  # the chunk is committed by a complete pass
        for layer in range(LAYERS):
            session.attend(layer, *coded_qkv(layer, 0, 3))
    assert session.next_frame == 3
    assert frames_of(session.layers[1].context()[0]) == [0, 1, 2]


def test_a_failing_context_pass_commits_nothing():
    session = session_for(MemFlowConfig.longlive())
    run_chunk(session, coded_qkv)
    session.begin_chunk()
    before = [cache.state_dict() for cache in session.layers]
    with pytest.raises(RuntimeError, match="model failed"), session.context_pass():
        session.attend(0, *coded_qkv(0, 3, 3))
        raise RuntimeError("model failed")
    after = [cache.state_dict() for cache in session.layers]
    for old, new in zip(before, after, strict=True):
        assert all(torch.equal(old[name], new[name]) for name in old)
    with session.context_pass():
        for layer in range(LAYERS):
            session.attend(layer, *coded_qkv(layer, 3, 3))
    assert frames_of(session.layers[0].context()[0]) == [0, 1, 2, 3, 4, 5]


def test_a_recache_pass_that_fails_part_of_the_way_marks_the_session_unusable():
    session = session_for(MemFlowConfig.longlive())
    run_chunk(session, coded_qkv)
    session.begin_chunk()
    with pytest.raises(RuntimeError, match="model failed"), session.switch_prompt():
        session.attend(0, *coded_qkv(0, 0, 3))
        raise RuntimeError("model failed")
    with pytest.raises(SessionStateError, match="layers \\[0\\] rewrote"):
        session.begin_chunk()


def test_a_failing_denoise_pass_leaves_the_session_usable():
    session = session_for(MemFlowConfig.longlive())
    session.begin_chunk()
    with pytest.raises(RuntimeError, match="model failed"), session.denoise_pass():
        raise RuntimeError("model failed")
    with session.context_pass():
        for layer in range(LAYERS):
            session.attend(layer, *coded_qkv(layer, 0, 3))
    assert session.next_frame == 3


@pytest.mark.parametrize(
    ("query", "key", "message"),
    [
        (frame_coded(0, 4), frame_coded(0, 4), "a chunk pass must hold 1..frames_per_chunk=3"),
        (frame_coded(0, 2), frame_coded(0, 3), "query must have the key's shape"),
        (
            torch.zeros(BATCH, 10, HEADS, DIM),
            torch.zeros(BATCH, 10, HEADS, DIM),
            "not a whole number of frames",
        ),
        (
            torch.zeros(BATCH, 12, HEADS * DIM),
            torch.zeros(BATCH, 12, HEADS * DIM),
            r"key must be \[batch, frames \* tokens_per_frame, heads, head_dim\]",
        ),
    ],
)
def test_bad_shapes_are_rejected(query, key, message):
    session = session_for(MemFlowConfig.longlive())
    session.begin_chunk()
    with pytest.raises(ValueError, match=message), session.denoise_pass():
        session.attend(0, query, key, key)


def test_every_pass_of_a_chunk_holds_the_same_frames():
    session = session_for(MemFlowConfig.longlive(), layers=1)
    session.begin_chunk()
    with session.denoise_pass():
        session.attend(0, *coded_qkv(0, 0, 3))
    with pytest.raises(ValueError, match="this chunk has 3, got 2"), session.context_pass():
        session.attend(0, *coded_qkv(0, 0, 2))


def test_a_layer_index_out_of_range_is_an_error():
    session = session_for(MemFlowConfig.longlive())
    session.begin_chunk()
    with (
        pytest.raises(IndexError, match=r"layer must be in \[0, 2\), got 2"),
        session.denoise_pass(),
    ):
        session.attend(2, *coded_qkv(0, 0, 3))


def test_nam_needs_one_text_key_tensor_per_layer_of_the_right_shape(generator):
    session = session_for(MemFlowConfig.reference())
    with pytest.raises(ValueError, match=r"one \[B, L_text, H, D\] tensor per layer \(2\)"):
        session.begin_chunk(None)
    with pytest.raises(ValueError, match="got 1 tensors"):
        session.begin_chunk(text_keys_for(generator, layers=1))
    run_chunk(session, coded_qkv, text_keys_for(generator))
    wrong_heads = [torch.zeros(BATCH, 6, HEADS + 1, DIM)] * LAYERS
    with pytest.raises(ValueError, match=r"expected \[B=2, L_text, H=2, D=8\]"):
        session.begin_chunk(wrong_heads)


def test_session_arguments_are_validated():
    with pytest.raises(TypeError, match="config must be a MemFlowConfig"):
        StreamingSession({"sink_frames": 3}, num_layers=1, tokens_per_frame=4)
    with pytest.raises(ValueError, match="num_layers must be an int >= 1, got 0"):
        StreamingSession(MemFlowConfig.reference(), num_layers=0, tokens_per_frame=4)
