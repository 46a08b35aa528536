"""One streaming loop: the chunk plan every caller uses, and ``stream()`` with per-chunk decoded
frames, live prompt changes and pause/resume (architecture s.5b)."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from integrations.helios import HELIOS_LATENT_FRAMES_PER_CHUNK, HeliosIntegration
from integrations.wan import WanIntegration
from memflow_adapter import MemFlowConfig, apply_memflow
from memflow_adapter.hooks import get_memflow, remove_memflow
from memflow_adapter.pipeline import MemFlowStreamingPipeline, PromptSchedule
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_adapter.streaming import (
    ChunkEngine,
    PromptConditioning,
    applied_segment_starts,
    plan_chunks,
)
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline
from memflow_apps.world.pipeline import build_world_pipeline

from family_helios import tiny_helios
from family_skyreels_v2 import tiny_skyreels_v2

PROMPTS = ["a cat", "a dog", "a bird"]
SIZE = 32  # pixels: 4x4 latents, 2x2 patches -> 4 tokens per latent frame
REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_wan_pipeline(seed=0)


def streaming(pipe, config=None, schedule=None):
    if get_memflow(pipe.transformer) is not None:
        remove_memflow(pipe.transformer)
    return MemFlowStreamingPipeline(
        pipe, config or MemFlowConfig.reference_sma(), schedule, device="cpu"
    )


def stream(pipe, prompt, num_latent_frames, seed=0, **kwargs):
    defaults = dict(height=SIZE, width=SIZE, max_sequence_length=16, output_type="np",
                    generator=torch.Generator().manual_seed(seed))
    return streaming(pipe).stream(prompt, num_latent_frames, **{**defaults, **kwargs})


# ------------------------------------------------------------------------------ the chunk plan
@settings(max_examples=200, deadline=None)
@given(
    frames_per_prompt=st.integers(1, 50),
    frames_per_chunk=st.integers(1, 5),
    num_prompts=st.integers(1, 6),
    extra_frames=st.integers(0, 30),
)
def test_a_chunk_recaches_iff_a_switch_frame_falls_since_the_previous_chunk_began(
    frames_per_prompt, frames_per_chunk, num_prompts, extra_frames
):
    """Every segment change recaches once, at the first chunk boundary at or after its switch
    frame; no other chunk recaches; every frame is in exactly one chunk."""
    schedule = PromptSchedule.from_prompts([f"p{i}" for i in range(num_prompts)],
                                           frames_per_prompt)
    num_frames = (num_prompts - 1) * frames_per_prompt + 1 + extra_frames
    plan = schedule.plan(num_frames, frames_per_chunk)
    switches = schedule.segment_starts[1:]
    assert [frame for chunk in plan for frame in range(chunk.start, chunk.stop)] == list(
        range(num_frames)
    )
    for previous, chunk in zip(plan, plan[1:], strict=False):
        switched = any(previous.start < s <= chunk.start for s in switches)
        assert chunk.recache == switched
        assert chunk.segment == schedule.segment_at(chunk.start)
        assert chunk.prompt == schedule.prompt_at(chunk.start)
    assert not plan[0].recache
    recached = [chunk.start for chunk in plan if chunk.recache]
    applied = {-(-s // frames_per_chunk) * frames_per_chunk for s in switches}
    assert recached == sorted(a for a in applied if a < num_frames)
    # what the recipes plan (segment starts only) is what the pipeline plans (with prompts)
    recipes = plan_chunks(schedule.segment_starts, num_frames, frames_per_chunk)
    assert [(c.index, c.start, c.stop, c.segment, c.recache) for c in recipes] == [
        (c.index, c.start, c.stop, c.segment, c.recache) for c in plan
    ]


def test_a_switch_between_chunk_boundaries_recaches_at_the_next_boundary():
    """The reference protocol: a prompt every 40 latent frames, 3-frame chunks."""
    schedule = PromptSchedule.from_prompts([f"p{i}" for i in range(6)], 40)
    plan = schedule.plan(240, 3)
    assert [chunk.start for chunk in plan if chunk.recache] == [42, 81, 120, 162, 201]
    assert applied_segment_starts(schedule.segment_starts, 240, 3) == [0, 42, 81, 120, 162, 201]
    same_text = PromptSchedule((("a", 0), ("a", 6))).plan(12, 3)
    assert [chunk.recache for chunk in same_text] == [False, False, True, False]


def test_a_segment_with_no_chunk_of_its_own_is_named():
    with pytest.raises(ValueError, match=r"segments \[1\] .* get no chunk of 3 frames"):
        applied_segment_starts([0, 1, 2], 9, 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: plan_chunks([0, 4], 0, 3), "num_latent_frames must be an int >= 1, got 0"),
        (lambda: plan_chunks([0, 4], 9, 0), "frames_per_chunk must be an int >= 1, got 0"),
        (lambda: plan_chunks([1, 4], 9, 3), r"segment_starts must increase from 0, got \[1, 4\]"),
        (lambda: plan_chunks([0, 4, 4], 9, 3), "segment_starts must increase from 0"),
        (lambda: PromptSchedule.from_prompts(["a", "b"], 0), "frames_per_prompt must be an int"),
    ],
)
def test_bad_plans_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------- the pipeline runs the plan
@pytest.mark.parametrize(("frames_per_prompt", "recached_at"), [(6, [6, 12]), (5, [6, 12])])
def test_the_pipeline_recaches_where_the_plan_says_also_off_chunk_boundaries(
    tiny_pipe, frames_per_prompt, recached_at, monkeypatch
):
    """The issue's report: switches at 5 and 10 with 3-frame chunks were never recached."""
    from memflow_adapter.session import StreamingSession

    recaches = []
    switch = StreamingSession.switch_prompt

    def recorded(self):
        recaches.append(self.next_frame)
        return switch(self)

    monkeypatch.setattr(StreamingSession, "switch_prompt", recorded)
    result = streaming(tiny_pipe)(
        PROMPTS, 15, SIZE, SIZE, frames_per_prompt=frames_per_prompt, output_type="latent",
        max_sequence_length=16, progress=False, generator=torch.Generator().manual_seed(0),
    )
    assert recaches == recached_at
    assert [c.start_frame for c in result.chunks if c.recached] == recached_at
    plan = PromptSchedule.from_prompts(PROMPTS, frames_per_prompt).plan(15, 3)
    assert [(c.start_frame, c.prompt) for c in result.chunks] == [(p.start, p.prompt) for p in plan]


# ------------------------------------------------------------------------------------ stream()
def test_call_is_the_collected_stream_bit_for_bit(tiny_pipe):
    chunks = list(stream(tiny_pipe, PROMPTS, 11, frames_per_prompt=4))
    whole = streaming(tiny_pipe)(
        PROMPTS, 11, SIZE, SIZE, frames_per_prompt=4, max_sequence_length=16,
        generator=torch.Generator().manual_seed(0), progress=False,
    )
    assert [chunk.report.num_frames for chunk in chunks] == [3, 3, 3, 2]
    assert torch.equal(torch.cat([chunk.latents for chunk in chunks], 2), whole.latents)
    assert np.array_equal(np.concatenate([chunk.frames for chunk in chunks], 1), whole.frames)
    assert [chunk.memory for chunk in chunks] == whole.trace
    assert whole.frames.shape == (1, 4 * 10 + 1, SIZE, SIZE, 3)
    assert [chunk.frames.shape[1] for chunk in chunks] == [9, 12, 12, 8]  # 1 + 4 * (n - 1)
    assert whole.seconds_to_first_frame > 0


def test_frames_decoded_chunk_by_chunk_are_the_video_decoded_at_the_end(tiny_pipe):
    """Wan's causal VAE decodes frame by frame with a feature cache either way; at the end the
    1x1x1 ``post_quant_conv`` runs over all frames at once, which may take another kernel:
    float32 round-off only (1e-5 on frames in [-1, 1], far below a wrong frame's ~1e-1)."""
    video = stream(tiny_pipe, PROMPTS, 11, frames_per_prompt=4, output_type="pt").collect()
    latents = video.latents
    whole = WanIntegration(tiny_pipe.transformer).decode_latents(tiny_pipe.vae, latents)
    expected = tiny_pipe.video_processor.postprocess_video(whole, output_type="pt")
    torch.testing.assert_close(video.frames, expected, rtol=0, atol=1e-5)


def test_helios_decodes_chunk_by_chunk_as_it_decodes_its_own_chunks(tiny_pipe):
    """Helios decodes each 9-latent-frame chunk on its own: the stream's decoder restarts its
    cache at the same frames, so 3-frame chunks give the same video."""
    integration = HeliosIntegration(tiny_helios())
    latents = torch.randn(1, 16, 2 * HELIOS_LATENT_FRAMES_PER_CHUNK + 2, 4, 4,
                          generator=torch.Generator().manual_seed(0))
    decoder = integration.latent_decoder(tiny_pipe.vae)
    with torch.no_grad():
        streamed = torch.cat([decoder.decode(chunk) for chunk in latents.split(3, dim=2)], 2)
        whole = integration.decode_latents(tiny_pipe.vae, latents)
    assert streamed.shape == whole.shape == (1, 3, 2 * 33 + 5, SIZE, SIZE)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)


def test_the_world_decodes_each_chunk_on_its_own_exactly():
    pipe = build_world_pipeline(seed=0)
    streamed = streaming(pipe, MemFlowConfig.reference(frames_per_chunk=2))
    video = streamed.stream(
        ["a red ball", "a blue box"], 6, 32, 32, frames_per_prompt=4, output_type="pt",
        max_sequence_length=16, generator=torch.Generator().manual_seed(0),
    ).collect()
    whole = WanIntegration(pipe.transformer).decode_latents(pipe.vae, video.latents)
    expected = pipe.video_processor.postprocess_video(whole, output_type="pt")
    assert torch.equal(video.frames, expected)


def test_a_live_prompt_change_is_the_same_switch_given_up_front(tiny_pipe):
    """Switch to "a dog" after chunk 1 (frames 0..5 done): the chunk at frame 6 recaches, and
    every latent and frame equals the schedule ``(a cat, 0), (a dog, 5)`` given up front."""
    planned = list(stream(tiny_pipe, PromptSchedule((("a cat", 0), ("a dog", 5))), 12))
    live = stream(tiny_pipe, "a cat", 12)
    chunks = [next(live), next(live)]
    live.set_prompt("a dog")
    assert live.next_chunk.recache and live.next_chunk.prompt == "a dog"
    chunks += list(live)
    assert [c.report.recached for c in chunks] == [False, False, True, False]
    for got, want in zip(chunks, planned, strict=True):
        assert got.plan == want.plan
        assert torch.equal(got.latents, want.latents)
        assert np.array_equal(got.frames, want.frames)
    assert live.schedule == PromptSchedule((("a cat", 0), ("a dog", 6)))


def test_send_switches_then_runs_the_next_chunk_and_a_live_prompt_replaces_the_plan(tiny_pipe):
    live = stream(tiny_pipe, PROMPTS[:2], 12, frames_per_prompt=9)
    first = live.send(None)
    second = live.send("a fish")
    assert (first.plan.prompt, second.plan.prompt, second.plan.recache) == ("a cat", "a fish", True)
    assert live.schedule.entries == (("a cat", 0), ("a fish", 3))  # "a dog" at 9 was replaced
    assert [chunk.plan.recache for chunk in live] == [False, False]
    with pytest.raises(ValueError, match="the stream is complete"):
        live.set_prompt("a cow")


def test_a_paused_stream_resumes_bit_for_bit_in_a_new_stream(tiny_pipe):
    """The state between chunks (session, the VAE decoder's feature cache, latents, schedule,
    noise, generator) continues the video in a stream made with the same arguments."""
    whole = list(stream(tiny_pipe, PROMPTS, 12, frames_per_prompt=4))
    paused = stream(tiny_pipe, PROMPTS, 12, frames_per_prompt=4)
    next(paused)
    paused.set_prompt("a dog")  # live changes are part of the state
    next(paused)
    state = paused.state_dict()
    rest_paused = list(paused)

    resumed = stream(tiny_pipe, PROMPTS, 12, frames_per_prompt=4)
    resumed.load_state_dict(state)
    rest_resumed = list(resumed)
    assert resumed.schedule.entries == (("a cat", 0), ("a dog", 3))
    for got, want in zip(rest_resumed, rest_paused, strict=True):
        assert torch.equal(got.latents, want.latents)
        assert np.array_equal(got.frames, want.frames)
    assert not torch.equal(rest_resumed[0].latents, whole[2].latents)  # the switch took effect


def test_a_saved_stream_resumes_bit_for_bit_from_a_weights_only_file(tiny_pipe, tmp_path):
    """``save(path)`` writes tensors and built-in types only: ``torch.load(weights_only=True)``
    reads it, ``resume(path)`` makes the stream again from it alone, and a stream made without
    a generator takes the saved one's."""
    pipe = streaming(tiny_pipe)
    kwargs = dict(height=SIZE, width=SIZE, max_sequence_length=16, frames_per_prompt=4)
    paused = pipe.stream(PROMPTS, 12, generator=torch.Generator().manual_seed(0), **kwargs)
    next(paused)
    paused.set_prompt("a dog")
    next(paused)
    path = paused.save(tmp_path / "paused" / "stream.pt")
    rest_paused = list(paused)

    resumed = pipe.resume(path)
    made_without_generator = pipe.stream(PROMPTS, 12, **kwargs)
    made_without_generator.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.schedule.entries == (("a cat", 0), ("a dog", 3))
    for other in (resumed, made_without_generator):
        for got, want in zip(other, rest_paused, strict=True):
            assert got.plan == want.plan and torch.equal(got.latents, want.latents)
            assert np.array_equal(got.frames, want.frames)


def test_resuming_a_stream_made_with_its_own_step_noise_needs_it_again(tiny_pipe, tmp_path):
    g = torch.Generator().manual_seed(0)
    noise = {(c, s): torch.randn(1, 16, 3, 4, 4, generator=g) for c in range(2) for s in range(3)}
    pipe = streaming(tiny_pipe)
    given = pipe.stream("a cat", 6, SIZE, SIZE, max_sequence_length=16, output_type="latent",
                        step_noise=lambda c, s, shape: noise[(c, s)])
    next(given)
    path = given.save(tmp_path / "stream.pt")
    want = next(given)
    with pytest.raises(ValueError, match="made with its own step_noise: pass the same"):
        pipe.resume(path)
    resumed = pipe.resume(path, step_noise=lambda c, s, shape: noise[(c, s)])
    assert torch.equal(next(resumed).latents, want.latents)


def test_a_bad_state_changes_nothing(tiny_pipe):
    pipe = streaming(tiny_pipe)

    def new_stream(seed):
        return pipe.stream(PROMPTS, 9, SIZE, SIZE, frames_per_prompt=3, max_sequence_length=16,
                           generator=torch.Generator().manual_seed(seed))

    reference, target, donor = new_stream(0), new_stream(0), new_stream(5)
    next(reference), next(target), next(donor), next(donor)
    state = donor.state_dict()
    state["decoder"] = {**state["decoder"], "feature_cache": []}  # corrupt, found last
    with pytest.raises(ValueError, match="decoder state must hold"):
        target.load_state_dict(state)
    for got, want in zip(target, reference, strict=True):
        assert got.plan == want.plan and torch.equal(got.latents, want.latents)
        assert np.array_equal(got.frames, want.frames)


def test_stream_misuse_is_refused(tiny_pipe):
    started = stream(tiny_pipe, PROMPTS, 9, frames_per_prompt=3)
    next(started)
    with pytest.raises(ValueError, match="collect\\(\\) needs a stream that has not started"):
        started.collect()
    with pytest.raises(ValueError, match="every prompt must be a non-empty string"):
        started.set_prompt("  ")
    other = stream(tiny_pipe, PROMPTS[:2], 6, frames_per_prompt=3)
    with pytest.raises(ValueError, match=r"state is of a video of shape \(1, 16, 9, 4, 4\)"):
        other.load_state_dict(started.state_dict())


def test_a_guided_stream_runs_the_same_loop(tiny_pipe):
    """Guidance and a deterministic schedule are options of the one chunk step."""
    pipe = streaming(tiny_pipe, schedule=FlowMatchSchedule((1000, 500), stochastic=False))
    kwargs = dict(height=SIZE, width=SIZE, max_sequence_length=16, output_type="latent",
                  generator=torch.Generator().manual_seed(0), guidance_scale=3.0)
    one = pipe("a cat", 6, progress=False, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    two = pipe.stream("a cat", 6, **kwargs).collect()
    assert torch.equal(one.latents, two.latents)


def test_the_engine_passes_the_familys_conditioning_inputs_on_every_pass():
    """SkyReels-V2-DF-1.3B's fps class reaches the recache, denoising and context passes."""
    model = tiny_skyreels_v2()
    attachment = apply_memflow(model, MemFlowConfig.reference_sma())
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("fps")), with_kwargs=True
    )
    g = torch.Generator().manual_seed(0)
    conditions = [PromptConditioning.of(attachment, torch.randn(1, 8, 16, generator=g))
                  for _ in range(2)]
    noise = torch.randn(1, 16, 9, 4, 4, generator=g)
    session = attachment.create_session(4, 4)
    engine = ChunkEngine(model, session, FlowMatchSchedule((1000, 500)),
                         conditioning=attachment.integration.conditioning_inputs(1, 24))
    video = torch.zeros_like(noise)
    with torch.no_grad(), attachment.bind(session):
        for chunk in plan_chunks([0, 4], 9, 3):  # the chunk at 6 recaches
            engine.step(chunk, conditions[chunk.segment], noise, video,
                        lambda c, s, shape: torch.randn(shape, generator=g))
    remove_memflow(model)
    assert seen == [[1]] * (3 * (2 + 1) + 1)


def test_the_chunk_loop_yields_each_chunk_open_and_refuses_one_out_of_order(tiny_pipe):
    """``ChunkEngine.chunks`` opens each planned chunk, denoises it up to its exit step (looked
    up by chunk index) into the video, yields it open and commits it before the next; with
    ``commit_last=False`` the last stays open. A chunk that does not start at the session's next
    frame is refused, naming both."""
    attachment = streaming(tiny_pipe).attachment
    g = torch.Generator().manual_seed(0)
    conditions = [PromptConditioning.of(attachment, torch.randn(1, 8, 32, generator=g))
                  for _ in range(2)]
    noise = torch.randn(1, 16, 9, 4, 4, generator=g)
    chunks = plan_chunks([0, 6], 9, 3)  # the third chunk recaches
    schedule = FlowMatchSchedule((1000, 500), stochastic=False)
    session = attachment.create_session(4, 4)
    engine = ChunkEngine(tiny_pipe.transformer, session, schedule)
    video = torch.zeros_like(noise)
    seen = []
    with torch.no_grad(), attachment.bind(session):
        for opened in engine.chunks(chunks, conditions, video, noise=noise,
                                    exit_steps=[1, 0, 1], commit_last=False):
            chunk = opened.chunk
            seen.append((chunk.index, session.next_frame, opened.last))
            assert opened.cond is conditions[chunk.segment]
            assert torch.equal(opened.frames, video[:, :, chunk.start : chunk.stop])
            assert torch.equal(opened.frames, opened.denoised.clean.float())
        assert seen == [(0, 0, False), (1, 3, False), (2, 6, True)]
        assert session.next_frame == 6  # the last chunk is open
        # exit step 1: the last step's input is the re-noised estimate, not the initial noise
        assert not torch.equal(opened.denoised.exit_input, noise[:, :, 6:9].double())

    fresh = ChunkEngine(tiny_pipe.transformer, attachment.create_session(4, 4), schedule)
    with torch.no_grad(), attachment.bind(fresh.session):
        (first,) = fresh.chunks(chunks[:1], conditions, torch.zeros_like(noise), noise=noise,
                                exit_steps={0: 0})
        assert torch.equal(first.denoised.exit_input, noise[:, :, :3].double())  # no step ran
        with pytest.raises(ValueError, match=r"chunk.start must be the session's next frame "
                                             r"\(3\), got 6 \(chunk 2\)"):
            fresh.open_chunk(chunks[2], conditions[1], video)


# --------------------------------------------------------------------- one loop, in the core
LIFECYCLE = {"begin_chunk", "switch_prompt", "denoise_pass", "context_pass"}
ENGINE = REPOSITORY / "memflow_adapter" / "streaming.py"
SESSION = REPOSITORY / "memflow_adapter" / "session.py"


def test_only_the_core_engine_drives_the_chunk_lifecycle():
    """No application module (pipeline, recipes, eval, world, cli, hub, integrations) begins
    chunks or opens passes itself: they all go through ``streaming.ChunkEngine``."""
    offenders = []
    for folder in ("memflow_adapter", "memflow_apps", "recipes", "integrations"):
        for path in sorted((REPOSITORY / folder).rglob("*.py")):
            if path in (ENGINE, SESSION):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in LIFECYCLE:
                    offenders.append(f"{path.relative_to(REPOSITORY)}:{node.lineno} {node.attr}")
    assert offenders == []


def test_a_stream_holds_only_the_latents_a_recache_reads_and_computes_the_whole_video_loop(
    tiny_pipe,
):
    """The stream keeps the last ``cache_frames`` clean frames and one chunk on the device, not
    the video; late recaches read the same frames as the engine driven over the whole video."""
    config = MemFlowConfig.reference_sma()  # cache_frames 12, 3-frame chunks
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 16, 30, 4, 4, generator=g)
    step_noise = {(c, s): torch.randn(1, 16, 3, 4, 4, generator=g)
                  for c in range(10) for s in range(3)}
    schedule = PromptSchedule(((PROMPTS[0], 0), (PROMPTS[1], 15), (PROMPTS[2], 27)))
    streamed = streaming(tiny_pipe, config).stream(
        schedule, 30, height=SIZE, width=SIZE, max_sequence_length=16, output_type="latent",
        latents=noise, step_noise=lambda c, s, shape: step_noise[(c, s)],
    )
    assert tuple(streamed.recent.frames.shape) == (1, 16, 12 + 3, 4, 4)
    result = streamed.collect()
    assert streamed.recent.start > 0

    pipe = streaming(tiny_pipe, config)
    attachment = pipe.attachment
    session = attachment.create_session(4, 4)
    engine = ChunkEngine(tiny_pipe.transformer, session, pipe.schedule)
    video = torch.zeros_like(noise)
    with torch.no_grad(), attachment.bind(session):  # embeddings too, as the stream makes them
        conditions = [
            PromptConditioning.of(attachment, tiny_pipe.encode_prompt(
                text, do_classifier_free_guidance=False, max_sequence_length=16, device="cpu")[0])
            for text in PROMPTS
        ]
        for chunk in schedule.plan(30, 3):
            engine.step(chunk, conditions[chunk.segment], noise, video,
                        lambda c, s, shape: step_noise[(c, s)])
    assert torch.equal(result.latents, video)


def test_a_stream_keeps_only_the_current_chunks_trace_and_can_record_none(tiny_pipe):
    """The session holds one chunk's trace however long the stream; ``collect`` gathers every
    chunk's; ``record_trace=False`` records nothing and computes the same video."""
    traced = stream(tiny_pipe, PROMPTS[:2], 15, frames_per_prompt=6, output_type="latent")
    whole = traced.collect()
    assert len(traced.session.trace()) == 1 and len(whole.trace) == 5
    assert [memory.chunk_index for memory in whole.trace] == list(range(5))
    untraced = stream(tiny_pipe, PROMPTS[:2], 15, frames_per_prompt=6, output_type="latent",
                      record_trace=False)
    chunks = list(untraced)
    assert all(chunk.memory is None for chunk in chunks)
    assert torch.equal(torch.cat([chunk.latents for chunk in chunks], 2), whole.latents)


def test_a_live_prompt_replaces_the_switches_not_applied_yet():
    """Switches at 4 (applied at 6 with 3-frame chunks) and 9: a prompt typed for the chunk at
    frame 6 replaces both; one at 3 that has applied stays."""
    schedule = PromptSchedule((("a", 0), ("b", 3), ("c", 4), ("d", 9)))
    assert schedule.switched("e", 6, 3).entries == (("a", 0), ("b", 3), ("e", 6))
    assert schedule.switched("e", 0, 3).entries == (("e", 0),)
    with pytest.raises(ValueError, match="start_frame must be a chunk boundary"):
        schedule.switched("e", 5, 3)
