"""The streaming multi-prompt pipeline on an embedded tiny random-weight Wan."""

import pytest
import torch

from memflow_adapter import MemFlowConfig
from memflow_adapter.pipeline import MemFlowStreamingPipeline, PromptSchedule
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

PROMPTS = ["a red fox walks in the snow", "a boat on a blue lake", "a red fox in the snow"]
SIZE = 32  # pixels: 4x4 latents, 2x2 patches -> 4 tokens per latent frame


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_wan_pipeline(seed=0)


def streaming(pipe, config):
    from memflow_adapter.hooks import get_memflow, remove_memflow

    if get_memflow(pipe.transformer) is not None:
        remove_memflow(pipe.transformer)
    return MemFlowStreamingPipeline(pipe, config, device="cpu")


def generate(pipe, config, **kwargs):
    defaults = dict(
        prompt=PROMPTS,
        num_latent_frames=15,
        height=SIZE,
        width=SIZE,
        frames_per_prompt=6,
        output_type="latent",
        max_sequence_length=16,
        progress=False,
    )
    return streaming(pipe, config)(**{**defaults, **kwargs})


def test_prompt_schedule_switches_at_the_first_chunk_at_or_after_its_frame():
    schedule = PromptSchedule((("a", 0), ("b", 4), ("c", 9)))
    assert [schedule.prompt_at(f) for f in (0, 3, 4, 8, 9, 30)] == ["a", "a", "b", "b", "c", "c"]
    assert PromptSchedule.from_prompts(["a", "b"], 6).entries == (("a", 0), ("b", 6))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ((), "at least one"),
        ((("a", 3),), "first prompt must start at frame 0"),
        ((("a", 0), ("b", 0)), "start frames must be increasing"),
        ((("", 0),), "non-empty string"),
    ],
)
def test_bad_prompt_schedules_are_rejected(entries, message):
    with pytest.raises(ValueError, match=message):
        PromptSchedule(entries)


def test_generation_is_reproducible_with_a_seed(tiny_pipe):
    config = MemFlowConfig.reference()
    first = generate(tiny_pipe, config, generator=torch.Generator().manual_seed(7))
    second = generate(tiny_pipe, config, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first.latents, second.latents)
    other = generate(tiny_pipe, config, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(first.latents, other.latents)


def test_recache_happens_at_prompt_switches_and_the_cache_stays_bounded(tiny_pipe):
    result = generate(
        tiny_pipe,
        MemFlowConfig.reference(),
        num_latent_frames=30,
        generator=torch.Generator().manual_seed(0),
    )
    assert [c.start_frame for c in result.chunks] == list(range(0, 30, 3))
    assert [c.recached for c in result.chunks] == [
        False,
        False,
        True,
        False,
        True,
        False,
        False,
        False,
        False,
        False,
    ]
    assert [c.prompt for c in result.chunks][:5] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 + [
        PROMPTS[2]
    ]
    sizes = {chunk.cache_bytes for chunk in result.chunks[1:]}
    assert len(sizes) == 1  # preallocated once; never grows
    assert len(result.trace) == 10


@torch.no_grad()  # like the pipeline: some kernels differ in the last bit under autograd
def test_the_loop_is_exactly_the_documented_schedule(tiny_pipe):
    """Supplied initial and per-step noise make a run reproducible by another implementation:
    here, a hand-written loop over the session that follows architecture s.1 and s.4b."""
    config = MemFlowConfig.reference_sma()
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 16, 9, 4, 4, generator=g)
    step_noise = {
        (c, s): torch.randn(1, 16, 3, 4, 4, generator=g) for c in range(3) for s in range(3)
    }
    schedule = PromptSchedule(((PROMPTS[0], 0), (PROMPTS[1], 6)))
    result = generate(
        tiny_pipe,
        config,
        prompt=schedule,
        frames_per_prompt=None,
        num_latent_frames=9,
        latents=latents,
        step_noise=lambda c, s, shape: step_noise[(c, s)],
    )

    pipe = streaming(tiny_pipe, config)
    attachment, model = pipe.attachment, tiny_pipe.transformer
    table = FlowMatchSchedule()
    session = attachment.create_session(4, 4)
    embeds = {
        p: tiny_pipe.encode_prompt(
            p, do_classifier_free_guidance=False, max_sequence_length=16, device="cpu"
        )[0]
        for p in PROMPTS[:2]
    }
    clean_video = []
    with attachment.bind(session):
        for chunk in range(3):
            prompt = PROMPTS[0] if chunk < 2 else PROMPTS[1]
            session.begin_chunk(attachment.text_keys(embeds[prompt]))
            if chunk == 2:
                with session.switch_prompt() as window:
                    assert (window.start_frame, window.stop_frame) == (0, 6)
                    model(torch.cat(clean_video, 2), torch.zeros(1), embeds[prompt])
            x = latents[:, :, 3 * chunk : 3 * chunk + 3].double()
            for step, t in enumerate([1000.0, 937.5, 2500 / 3, 625.0]):
                with session.denoise_pass():
                    v = model(x.float(), torch.full((1,), t), embeds[prompt], return_dict=False)[0]
                x0 = x - table.sigma_at(t) * v.double()
                if step < 3:
                    sigma = table.sigma_at([937.5, 2500 / 3, 625.0][step])
                    x = (1 - sigma) * x0 + sigma * step_noise[(chunk, step)].double()
            clean = x0.float()
            with session.context_pass():
                model(clean, torch.zeros(1), embeds[prompt])
            clean_video.append(clean)
    assert torch.equal(result.latents, torch.cat(clean_video, 2))


def test_deterministic_sampling_steps_along_the_models_own_noise_estimate(tiny_pipe):
    """With ``stochastic=False`` no re-noising noise is drawn: the run depends on the initial
    noise only, and two steps from 1000 to 500 land where one flow-matching Euler step from
    1000 to 500 then one x0 estimate would."""
    config = MemFlowConfig.reference()
    schedule = FlowMatchSchedule((1000, 500), shift=1.0, stochastic=False)
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(4))

    def unused(chunk, step, shape):
        raise AssertionError("a deterministic schedule drew re-noising noise")

    pipe = streaming(tiny_pipe, config)
    pipe.schedule = schedule
    result = pipe(PROMPTS[0], num_latent_frames=3, height=SIZE, width=SIZE, latents=latents,
                  step_noise=unused, output_type="latent", max_sequence_length=16,
                  progress=False)

    attachment, model = pipe.attachment, tiny_pipe.transformer
    embeds = tiny_pipe.encode_prompt(PROMPTS[0], do_classifier_free_guidance=False,
                                     max_sequence_length=16, device="cpu")[0]
    session = attachment.create_session(4, 4)
    with attachment.bind(session):
        session.begin_chunk(attachment.text_keys(embeds))
        x = latents.double()
        with session.denoise_pass():
            v = model(x.float(), torch.full((1,), 1000.0), embeds, return_dict=False)[0]
        x = x - 0.5 * v.double()  # Euler from sigma 1 to sigma 0.5
        with session.denoise_pass():
            v = model(x.float(), torch.full((1,), 500.0), embeds, return_dict=False)[0]
        expected = (x - 0.5 * v.double()).float()
    torch.testing.assert_close(result.latents, expected, rtol=1e-5, atol=1e-5)


def one_step_chunk(pipe, **kwargs):
    """One chunk denoised in one step from sigma 1: its clean estimate is ``noise - flow``."""
    streamed = streaming(pipe, MemFlowConfig.reference())
    streamed.schedule = FlowMatchSchedule((1000,), shift=1.0)
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    return streamed(PROMPTS[0], num_latent_frames=3, height=SIZE, width=SIZE, latents=latents,
                    output_type="latent", max_sequence_length=16, progress=False, **kwargs).latents


def test_guidance_extrapolates_from_the_negative_prediction_by_its_scale(tiny_pipe):
    """Classifier-free guidance uses ``negative + scale * (prompt - negative)``: with one step
    the output moves linearly in the scale, scale 1 is the unguided run, and a negative equal
    to the prompt changes nothing."""
    unguided = one_step_chunk(tiny_pipe)
    guided = {scale: one_step_chunk(tiny_pipe, guidance_scale=scale) for scale in (2.0, 3.0)}
    assert torch.equal(one_step_chunk(tiny_pipe, guidance_scale=1.0), unguided)
    assert not torch.allclose(guided[2.0], unguided, atol=1e-3)
    torch.testing.assert_close(guided[3.0] - guided[2.0], guided[2.0] - unguided,
                               rtol=1e-4, atol=1e-5)
    same = one_step_chunk(tiny_pipe, guidance_scale=4.0, negative_prompt=PROMPTS[0])
    torch.testing.assert_close(same, unguided, rtol=1e-5, atol=1e-6)


def test_any_length_works_including_a_short_last_chunk(tiny_pipe):
    result = generate(
        tiny_pipe,
        MemFlowConfig.longlive(),
        prompt=PROMPTS[:2],
        num_latent_frames=7,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.latents.shape == (1, 16, 7, 4, 4)
    assert [c.num_frames for c in result.chunks] == [3, 3, 1]


def test_decoded_output_and_mp4_export(tiny_pipe, tmp_path):
    result = generate(
        tiny_pipe,
        MemFlowConfig.reference(),
        prompt=PROMPTS[0],
        num_latent_frames=6,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    video = result.frames
    assert video.shape == (1, 21, SIZE, SIZE, 3)  # 4 * (6 - 1) + 1 frames
    assert video.min() >= 0.0 and video.max() <= 1.0
    path = result.save_video(tmp_path / "video.mp4", fps=8)
    assert path.stat().st_size > 1000
    # the field's speed figures: video frames over denoising time, then with decoding too
    assert [chunk.video_frames for chunk in result.chunks] == [9, 12]  # 1 + 4 * 2, then 4 * 3
    generating = sum(chunk.seconds for chunk in result.chunks)
    decoding = sum(chunk.decode_seconds for chunk in result.chunks)
    assert result.denoise_fps == pytest.approx(21 / generating)
    assert result.end_to_end_fps == pytest.approx(21 / (generating + decoding))
    assert "CPU" in result.hardware


def test_latent_output_reports_no_video_frame_rate(tiny_pipe):
    result = generate(
        tiny_pipe, MemFlowConfig.reference(), prompt=PROMPTS[0], num_latent_frames=6
    )
    assert result.denoise_fps is None and result.end_to_end_fps is None
    assert all(chunk.seconds > 0 and chunk.decode_seconds >= 0 for chunk in result.chunks)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_type": "gif"}, "output_type must be"),
        ({"height": 30}, "multiples of the VAE's spatial factor 8"),
        ({"height": -8}, r"height must be an int >= 1 \(pixels\), got -8"),
        ({"width": 32.0}, r"width must be an int >= 1 \(pixels\), got 32.0"),
        ({"num_latent_frames": 0}, "num_latent_frames must be an int >= 1"),
        ({"latents": torch.zeros(1, 16, 2, 4, 4)}, r"latents must have shape \(1, 16, 15, 4, 4\)"),
        ({"frames_per_prompt": None}, "frames_per_prompt is required"),
        ({"guidance_scale": 0.5}, r"guidance_scale must be finite and >= 1 \(1 disables"),
        ({"guidance_scale": float("inf")}, r"finite and >= 1 \(1 disables guidance\), got inf"),
        ({"latents": torch.full((1, 16, 15, 4, 4), float("nan"))}, "latents must be finite"),
        ({"frames_per_prompt": 0}, "frames_per_prompt must be an int >= 1, got 0"),
        # the third prompt would start at frame 16, past the 15-frame video
        ({"frames_per_prompt": 8}, r"segments \[2\] \(starting at latent frames \[16\]\)"),
        # prompts at 0, 1, 2 with 3-frame chunks: the second never gets a chunk
        ({"frames_per_prompt": 1}, r"segments \[1\] \(starting at latent frames \[1\]\)"),
    ],
)
def test_bad_arguments_are_rejected(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_pipe, MemFlowConfig.reference(), **kwargs)


def test_a_transformer_already_streaming_with_another_config_is_refused(tiny_pipe):
    streaming(tiny_pipe, MemFlowConfig.reference())
    with pytest.raises(ValueError, match="already streams with"):
        MemFlowStreamingPipeline(tiny_pipe, MemFlowConfig.longlive(), device="cpu")


def test_a_removed_attachment_cannot_stream_without_memory(tiny_pipe):
    """After ``remove_memflow`` the old attachment, and a stream made with it, refuse to run
    instead of running the plain model without memory."""
    from memflow_adapter import SessionStateError
    from memflow_adapter.hooks import remove_memflow

    pipe = streaming(tiny_pipe, MemFlowConfig.reference())
    stream = pipe.stream(PROMPTS[0], 6, SIZE, SIZE, max_sequence_length=16, output_type="latent")
    session = pipe.attachment.create_session(4, 4)
    remove_memflow(tiny_pipe.transformer)
    with pytest.raises(SessionStateError, match="removed with remove_memflow"):
        next(stream)
    with pytest.raises(SessionStateError, match="cannot bind a session"), pipe.attachment.bind(
        session
    ):
        pass
    with pytest.raises(SessionStateError, match="cannot create a session"):
        pipe.attachment.create_session(4, 4)
