"""Streams longer than the model's RoPE table (architecture s.2b): while a video fits, nothing
changes; past the table, positions are re-based, exactly for the frames that keep their offset,
with a flat cache, on every family."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from integrations import find_integration
from integrations.wan import shorten_rope_table
from memflow_adapter import MemFlowConfig, SessionStateError, StreamingSession, apply_memflow
from memflow_adapter.hooks import remove_memflow
from memflow_adapter.positions import RopeTable, overflowed_positions

from families import FAMILIES, Family
from tiny_models import tiny_wan

CHUNK = 3
TABLE = 16  # the shortened RoPE table, in latent frames
rows = pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
WINDOW_ONLY = MemFlowConfig.reference(sink_frames=0, bank_frames=0, nam=False)


def declare_rope_frames(monkeypatch, model, frames: int) -> None:
    """Make ``model``'s integration declare a ``frames``-position RoPE table (every family; the
    Wan tests below also use a real 16-row table)."""
    monkeypatch.setattr(type(find_integration(model)), "rope_frames", lambda self: frames)


def stream(family: Family, model, config, inputs, num_frames, check=None):
    """One denoising pass and the context pass per chunk; ``check(session)`` runs inside every
    pass. Returns the denoising outputs, concatenated, the session and its bytes per chunk."""
    attachment = apply_memflow(model, config)
    session = attachment.create_session(*family.latent_size)
    text_keys = attachment.text_keys(inputs["encoder_hidden_states"])
    outputs, cache_bytes = [], []
    with attachment.bind(session):
        for start in range(0, num_frames, CHUNK):
            chunk = family.chunk(inputs, start, start + CHUNK)
            session.begin_chunk(text_keys)
            with session.denoise_pass():
                outputs.append(family.forward(model, chunk))
                if check:
                    check(session)
            with session.context_pass():
                family.forward(model, chunk)
            cache_bytes.append(session.cache_bytes)
    remove_memflow(model)
    return torch.cat(outputs, dim=family.frame_dim), session, cache_bytes


@torch.no_grad()
@rows
@pytest.mark.parametrize("preset", ["reference", "reference_sma"])
def test_every_family_streams_210_frames_through_a_16_frame_table_with_a_flat_cache(
    family, preset, generator, monkeypatch
):
    model = family.build()
    declare_rope_frames(monkeypatch, model, TABLE)
    frames = 70 * CHUNK
    positions = []
    output, session, cache_bytes = stream(
        family, model, MemFlowConfig.preset(preset), family.make_inputs(generator, frames), frames,
        check=lambda s: positions.append(s.pass_start_position),
    )
    assert torch.isfinite(output).all()
    assert session.position_base > 0
    assert all(p >= 0 and p + CHUNK <= TABLE for p in positions)
    assert len(set(cache_bytes[6:])) == 1  # constant once sink, bank and window are full


@torch.no_grad()
@rows
def test_a_re_based_window_equals_the_same_stream_with_a_table_long_enough(
    family, generator, monkeypatch
):
    """RoPE scores see only relative offsets, so moving every frame by the same amount changes
    nothing but float rounding (the re-rotation composes two rotations)."""
    model = family.build()
    frames = 30 * CHUNK
    inputs = family.make_inputs(generator, frames)
    fits, fitting, _ = stream(family, model, WINDOW_ONLY, inputs, frames)
    declare_rope_frames(monkeypatch, model, TABLE)
    rebased, session, _ = stream(family, model, WINDOW_ONLY, inputs, frames)
    assert fitting.position_base == 0 and session.position_base > 0
    torch.testing.assert_close(rebased, fits, rtol=1e-5, atol=1e-5)


MAX_CHUNKS = 64


def wan_stream(model, config, chunks, switches=(), session_state=None, from_chunk=0):
    """A tiny Wan stream (the same latents whatever its length, up to ``MAX_CHUNKS``) with the
    recache at each chunk of ``switches`` (the prompt alternates).
    Returns every denoising output ``[1, 16, 3 * chunks, 4, 4]`` and the session."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randn(1, 8, 16, generator=generator) for _ in range(2)]
    latents = torch.randn(1, 16, CHUNK * MAX_CHUNKS, 4, 4, generator=generator)
    attachment = apply_memflow(model, config)
    session = attachment.create_session(4, 4)
    if session_state is not None:
        session.load_state_dict(session_state)
    prompt = sum(1 for c in switches if c < from_chunk) % 2
    outputs = []
    with attachment.bind(session), torch.no_grad():
        for chunk in range(from_chunk, chunks):
            if chunk in switches:
                prompt = 1 - prompt
            session.begin_chunk(attachment.text_keys(prompts[prompt]))
            if chunk in switches:
                with session.switch_prompt() as window:
                    model(latents[:, :, window.start_frame : window.stop_frame],
                          torch.tensor([0]), prompts[prompt])
            frames = latents[:, :, chunk * CHUNK : (chunk + 1) * CHUNK]
            with session.denoise_pass():
                outputs.append(model(frames, torch.tensor([500]), prompts[prompt],
                                     return_dict=False)[0])
            with session.context_pass():
                model(frames, torch.tensor([0]), prompts[prompt])
    remove_memflow(model)
    return torch.cat(outputs, dim=2), session


@pytest.mark.parametrize("preset", ["reference", "reference_sma", "longlive"])
def test_a_video_that_fits_the_table_is_bit_identical_to_one_with_a_longer_table(preset):
    config = MemFlowConfig.preset(preset)
    short, _ = wan_stream(tiny_wan(rope_max_seq_len=TABLE), config, 5, switches=(3,))
    long, session = wan_stream(tiny_wan(), config, 5, switches=(3,))
    assert session.position_base == 0 and torch.equal(short, long)


def test_a_shortened_rope_table_is_the_table_of_a_model_configured_that_short():
    shortened = tiny_wan()
    shorten_rope_table(shortened, TABLE)
    built = tiny_wan(rope_max_seq_len=TABLE)
    assert shortened.rope.max_seq_len == shortened.config.rope_max_seq_len == TABLE
    assert torch.equal(shortened.rope.freqs_cos, built.rope.freqs_cos)
    assert torch.equal(shortened.rope.freqs_sin, built.rope.freqs_sin)
    with pytest.raises(ValueError, match="frames must be an int in 1..16"):
        shorten_rope_table(shortened, 17)


def test_re_based_recaches_of_a_tiny_wan_with_a_16_frame_table_match_a_1024_frame_one():
    """The model's own 16-row table (not a declared length): the window-only layout with prompt
    switches, whose recaches re-encode frames at re-based positions too."""
    short, session = wan_stream(tiny_wan(rope_max_seq_len=TABLE), WINDOW_ONLY, 40, (7, 15, 31))
    long, _ = wan_stream(tiny_wan(), WINDOW_ONLY, 40, (7, 15, 31))
    assert session.position_base > 0
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["before_window", "clamp"])
def test_a_re_based_stream_pauses_and_resumes_bit_identically(policy):
    config = MemFlowConfig.reference(position_overflow=policy)
    model = tiny_wan(rope_max_seq_len=TABLE)
    whole, _ = wan_stream(model, config, 24, switches=(9, 17))
    _, paused = wan_stream(model, config, 12, switches=(9, 17))
    assert paused.position_base > 0
    rest, _ = wan_stream(model, config, 24, (9, 17), paused.state_dict(), from_chunk=12)
    assert torch.equal(rest, whole[:, :, 12 * CHUNK :])


def test_the_position_policies_differ_only_past_the_table():
    model = tiny_wan(rope_max_seq_len=TABLE)
    before, _ = wan_stream(model, MemFlowConfig.reference(position_overflow="before_window"), 30)
    clamp, _ = wan_stream(model, MemFlowConfig.reference(position_overflow="clamp"), 30)
    first_rebase = TABLE // CHUNK  # the chunk that would end past the table
    fit = first_rebase * CHUNK
    assert torch.equal(before[:, :, :fit], clamp[:, :, :fit])
    assert not torch.allclose(before[:, :, fit:], clamp[:, :, fit:])


def test_a_table_shorter_than_one_chunks_positions_is_refused_naming_the_sizes():
    rope = RopeTable(14, lambda keys, shift: keys)
    with pytest.raises(ValueError, match="needs 15 positions.*sink_frames or local_frames"):
        StreamingSession(MemFlowConfig.reference(), num_layers=1, tokens_per_frame=4, rope=rope)


def test_an_unbounded_window_past_the_table_is_refused_before_the_chunk_changes_anything():
    model = tiny_wan(rope_max_seq_len=TABLE)
    config = MemFlowConfig.full_history()
    attachment = apply_memflow(model, config)
    session = attachment.create_session(4, 4)
    prompt, latents = torch.zeros(1, 8, 16), torch.zeros(1, 16, CHUNK, 4, 4)
    with attachment.bind(session), torch.no_grad():
        for _ in range(5):
            session.begin_chunk()
            with session.context_pass():
                model(latents, torch.tensor([0]), prompt)
        before = session.state_dict()
        with pytest.raises(ValueError, match="unbounded local window.*local_frames=None"):
            session.begin_chunk()
        with pytest.raises(SessionStateError, match="needs an open chunk"), session.denoise_pass():
            pass
    assert all(torch.equal(session.state_dict()[k], v) for k, v in before.items())


def test_the_default_policy_is_before_window_the_one_ahead_on_the_final_world_stories():
    """Measured with bench/narrative_eval.py through a 10-frame table (architecture s.2b)."""
    assert MemFlowConfig().position_overflow == "before_window"
    assert MemFlowConfig.reference().position_overflow == "before_window"


def test_clamp_puts_frames_that_no_longer_fit_at_position_zero():
    positions = torch.tensor([[0, 1, 2, 30, 38]])
    assert overflowed_positions(positions, 20, 22, "clamp").tolist() == [[0, 0, 0, 10, 18]]


def test_before_window_packs_frames_that_no_longer_fit_just_before_the_oldest_that_does():
    positions = torch.tensor([[0, 1, 2, 30, 38], [0, 1, 2, 5, 9]])
    assert overflowed_positions(positions, 20, 22, "before_window").tolist() == [
        [7, 8, 9, 10, 18],  # three frames before the bank frame now at 10
        [17, 18, 19, 20, 21],  # all five before the window at 22
    ]


@given(
    st.lists(st.integers(0, 1000), min_size=1, max_size=8),
    st.integers(1, 1000),
    st.sampled_from(["before_window", "clamp"]),
)
def test_re_based_memory_positions_keep_their_order_and_stay_in_the_table(
    positions, shift, policy
):
    old = torch.tensor([sorted(positions)])
    window = max(0, max(positions) - shift) + 1  # the window comes after every memory frame
    new = overflowed_positions(old, shift, window, policy)
    assert (new >= 0).all() and (new < window).all()
    assert (new.diff(dim=1) >= 0).all()
    fits = old - shift >= 0
    assert torch.equal(new[fits], (old - shift)[fits])


@pytest.mark.slow
def test_the_soak_bench_streams_past_the_table_with_flat_memory_and_bounded_latents():
    """bench/long_stream_soak.py, shortened: cache bytes flat, RSS flat, the stream's recent
    latents one cache (sink 3 + local 9) plus one chunk."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "long_stream_soak.py"
    result = subprocess.run(
        [sys.executable, str(bench), "--chunks", "40", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "its recent clean latents: (1, 16, 15, 8, 8)" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:2] in ("10", "40")]
    assert [row[0] for row in rows] == ["10", "40"]
    assert all(row[8] == "1.00" for row in rows)  # x cache
    assert all(float(row[6]) <= 1.02 for row in rows)  # x RSS: the allocator may round up pages
    assert int(rows[-1][-1]) > 0  # positions were re-based
    assert "120 latent frames through a 16-frame RoPE table" in result.stdout
