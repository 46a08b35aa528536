"""Every public argument of the pipeline (``stream()``, ``__call__``, ``resume``, a stream's
``next()``, ``set_prompt`` and ``load_state_dict``, ``save_video``) and of the configs
(``MemFlowConfig``, ``FlowMatchSchedule``, ``PromptSchedule``): a bad value is refused with an
error naming the parameter and what it expects, before anything changes."""

import math

import numpy as np
import pytest
import torch

from memflow_adapter import MemFlowConfig, MemFlowStreamingPipeline
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_adapter.stream import StreamingVideoOutput
from memflow_adapter.streaming import PromptSchedule
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

SIZE = 32  # pixels: 4x4 latents
#: A valid stream (2 chunks of 3 latent frames); each row changes one argument.
GOOD = dict(prompt="a cat", num_latent_frames=6, height=SIZE, width=SIZE, max_sequence_length=16,
            output_type="latent")
SCHEDULE = PromptSchedule((("a cat", 0), ("a dog", 3)))
MISSING = object()  # a state key left out


def bad_noise(value):
    return lambda chunk_index, step_index, shape: value


ROWS = [
    # (call, argument, bad value, error, message fragment)
    ("stream", "prompt", None, TypeError, "prompt must be a str, a non-empty list of str"),
    ("stream", "prompt", 123, TypeError, "prompt must be a str, a non-empty list of str"),
    ("stream", "prompt", [], TypeError, r"or a PromptSchedule, got \[\]"),
    ("stream", "prompt", ["a cat", 5], TypeError, "prompt must be a str, a non-empty list of str"),
    ("stream", "prompt", " ", ValueError, "every prompt must be a non-empty string"),
    ("stream", "prompt", ["a cat", "a dog"], ValueError, "frames_per_prompt is required"),
    ("stream", "frames_per_prompt", 0, ValueError, "frames_per_prompt must be an int >= 1, got 0"),
    ("stream", "frames_per_prompt", "3", ValueError, "frames_per_prompt must be an int >= 1"),
    ("stream(schedule)", "frames_per_prompt", 3, ValueError,
     "frames_per_prompt is for a list of prompts; a PromptSchedule carries its own start frames"),
    ("stream", "num_latent_frames", 0, ValueError, "num_latent_frames must be an int >= 1, got 0"),
    ("stream", "num_latent_frames", "6", ValueError, "num_latent_frames must be an int >= 1"),
    ("stream", "num_latent_frames", True, ValueError, "num_latent_frames must be an int >= 1"),
    ("stream", "height", -8, ValueError, r"height must be an int >= 1 \(pixels\), got -8"),
    ("stream", "height", 30, ValueError, "multiples of the VAE's spatial factor 8, got 30x32"),
    ("stream", "width", 32.0, ValueError, r"width must be an int >= 1 \(pixels\), got 32.0"),
    ("stream", "num_videos", 0, ValueError, "num_videos must be an int >= 1, got 0"),
    ("stream", "num_videos", -1, ValueError, "num_videos must be an int >= 1, got -1"),
    ("stream", "num_videos", 1.0, ValueError, "num_videos must be an int >= 1, got 1.0"),
    ("stream", "generator", 0, TypeError, "generator must be a torch.Generator .* got 0"),
    ("stream", "generator", [torch.Generator()], TypeError, "generator must be a torch.Generator"),
    ("stream", "latents", torch.zeros(1, 16, 2, 4, 4), ValueError,
     r"latents must have shape \(1, 16, 6, 4, 4\), got \(1, 16, 2, 4, 4\)"),
    ("stream", "latents", torch.full((1, 16, 6, 4, 4), math.nan), ValueError,
     "latents must be finite"),
    ("stream", "latents", np.zeros((1, 16, 6, 4, 4)), TypeError,
     "latents must be a floating-point torch.Tensor, got ndarray"),
    ("stream", "latents", torch.zeros(1, 16, 6, 4, 4, dtype=torch.long), TypeError,
     "latents must be a floating-point torch.Tensor, got torch.int64"),
    ("stream", "step_noise", torch.zeros(1), TypeError,
     r"step_noise must be a function \(chunk_index, step_index, shape\) -> tensor, got Tensor"),
    ("stream", "output_type", "gif", ValueError, "output_type must be one of"),
    ("stream", "output_type", None, ValueError, "output_type must be one of .* got None"),
    ("stream", "max_sequence_length", 0, ValueError, "max_sequence_length must be an int >= 1"),
    ("stream", "fps", -1, ValueError, r"fps must be an int >= 1 \(frames per second\), got -1"),
    ("stream", "fps", 0, ValueError, r"fps must be an int >= 1 \(frames per second\), got 0"),
    ("stream", "guidance_scale", "2", TypeError, "guidance_scale must be a number, .* got '2'"),
    ("stream", "guidance_scale", 0.5, ValueError, r"guidance_scale must be finite and >= 1"),
    ("stream", "guidance_scale", math.nan, ValueError, "guidance_scale must be finite and >= 1"),
    ("stream", "guidance_scale", math.inf, ValueError, "guidance_scale must be finite and >= 1"),
    ("stream", "negative_prompt", 5, TypeError, "negative_prompt must be a str or None, got 5"),
    ("stream", "negative_prompt", "", ValueError,
     "negative_prompt is only used with guidance_scale > 1"),
    ("stream", "record_trace", "yes", TypeError, "record_trace must be a bool, got 'yes'"),
    ("__call__", "prompt", None, TypeError, "prompt must be a str, a non-empty list of str"),
    ("__call__", "num_videos", 0, ValueError, "num_videos must be an int >= 1, got 0"),
    ("__call__", "generator", 0, TypeError, "generator must be a torch.Generator"),
    ("__call__", "guidance_scale", "2", TypeError, "guidance_scale must be a number"),
    ("__call__", "max_sequence_length", 0, ValueError, "max_sequence_length must be an int >= 1"),
    ("__call__", "progress", "no", TypeError, "progress must be a bool, got 'no'"),
    ("next(stream)", "step_noise", bad_noise(torch.zeros(1, 16, 1, 4, 4)), ValueError,
     r"step_noise\(0, 0, shape\) must return a finite floating-point tensor of shape "
     r"\(1, 16, 3, 4, 4\), got shape \(1, 16, 1, 4, 4\)"),
    ("next(stream)", "step_noise", bad_noise(torch.full((1, 16, 3, 4, 4), math.inf)), ValueError,
     r"step_noise\(0, 0, shape\) must return a finite floating-point tensor"),
    ("next(stream)", "step_noise", bad_noise(None), ValueError,
     r"step_noise\(0, 0, shape\) must return .*, got NoneType"),
    ("set_prompt", "prompt", 123, ValueError, "every prompt must be a non-empty string, got 123"),
    ("load_state_dict", "state", {}, ValueError,
     r"state is missing \['session', .*expected a VideoStream.state_dict\(\)"),
    ("load_state_dict", "state", 5, TypeError, "state must be a VideoStream.state_dict()"),
    ("load_state_dict", "noise", MISSING, ValueError, r"state is missing \['noise'\]"),
    ("load_state_dict", "noise", torch.zeros(1, 16, 9, 4, 4), ValueError,
     r"state is of a video of shape \(1, 16, 9, 4, 4\) \(state\['noise'\]\)"),
    ("load_state_dict", "recent", torch.zeros(1), ValueError,
     r"state is of recent latents of shape \(1,\) \(state\['recent'\]\)"),
    ("load_state_dict", "recent_start", -1, ValueError,
     r"state\['recent_start'\] must be an int >= 0, got -1"),
    ("load_state_dict", "schedule", [["", 0]], ValueError,
     "bad schedule or last chunk: every prompt must be a non-empty string"),
    ("load_state_dict", "previous", {"index": "0"}, ValueError,
     "chunk plan field 'index' must be an int >= 0"),
    ("load_state_dict", "generator", 5, ValueError,
     r"state\['generator'\] must be None or \{'state': ByteTensor, 'device': str\}"),
    ("load_state_dict", "arguments", {"height": SIZE, "width": SIZE, "output_type": "latent",
                                      "max_sequence_length": 16, "fps": 16,
                                      "guidance_scale": 3.0, "negative_prompt": None,
                                      "step_noise_given": False}, ValueError,
     "made with guidance_scale=3.0, this one has guidance_scale=1.0: make the stream with"),
    ("load_state_dict", "session", {}, KeyError, "session state is missing"),
    ("resume", "state", "absent.pt", FileNotFoundError, "no saved stream at 'absent.pt'"),
    ("resume", "state", {"noise": torch.zeros(1)}, ValueError,
     r"state must be a VideoStream.state_dict\(\) \(keys 'arguments'"),
    ("save_video", "fps", -1, ValueError, "fps must be a finite number > 0 .* got -1"),
    ("save_video", "fps", "16", ValueError, "fps must be a finite number > 0"),
    ("save_video", "batch_index", 1, ValueError, r"batch_index must be an int in 0..0 .* got 1"),
    ("MemFlowStreamingPipeline", "config", "reference", TypeError,
     "config must be a MemFlowConfig, got str"),
    ("MemFlowStreamingPipeline", "schedule", (1000, 500), TypeError,
     "schedule must be a FlowMatchSchedule or None, got tuple"),
    ("MemFlowConfig", "sink_frames", -1, ValueError, "sink_frames must be >= 0, got -1"),
    ("MemFlowConfig", "sink_frames", True, TypeError, "sink_frames must be an int, got True"),
    ("MemFlowConfig", "sink_frames", 10**6, ValueError, "sink_frames must be <= 16384"),
    ("MemFlowConfig", "bank_frames", 0, ValueError, "bank_frames must be >= 1 when nam=True"),
    ("MemFlowConfig", "local_frames", 2, ValueError, "local_frames must be >= frames_per_chunk"),
    ("MemFlowConfig", "local_frames", 9.0, TypeError, "local_frames must be an int"),
    ("MemFlowConfig", "frames_per_chunk", 0, ValueError, "frames_per_chunk must be >= 1"),
    ("MemFlowConfig", "record_interval", 0, ValueError, "record_interval must be >= 1"),
    ("MemFlowConfig", "bank_staging", "sometimes", ValueError, "bank_staging must be one of"),
    ("MemFlowConfig", "bank_staging", None, TypeError, "bank_staging must be a str, got None"),
    ("MemFlowConfig", "nam", 1, TypeError, "nam must be a bool, got 1"),
    ("MemFlowConfig", "sma", "on", TypeError, "sma must be a bool, got 'on'"),
    ("MemFlowConfig", "sma_top_k", 0, ValueError, "sma_top_k must be >= 1, got 0"),
    ("MemFlowConfig.reference_sma", "sma_top_k", 100, ValueError,
     r"sma_top_k must be <= sink_frames \+ bank_frames \(6\), .* got sma_top_k=100"),
    ("MemFlowConfig", "cache_dtype", "fp4", ValueError, "cache_dtype must be None .* got 'fp4'"),
    ("MemFlowConfig", "cache_dtype", [], TypeError, r"cache_dtype must be a str, got \[\]"),
    ("MemFlowConfig", "position_overflow", "wrap", ValueError, "position_overflow must be one of"),
    ("MemFlowConfig", "attention_backend", "cudnn", ValueError, "attention_backend must be one of"),
    ("MemFlowConfig.from_json_file", "path", '{"sink_frames": 3, "bank_fr', ValueError,
     "config.json is not a MemFlowConfig JSON file: Unterminated string"),
    ("MemFlowConfig.from_json_file", "path", '{"sink_frames": "3"}', TypeError,
     "config.json: sink_frames must be an int, got '3'"),
    ("MemFlowConfig.from_json_file", "path", "[3]", ValueError,
     "config.json: a MemFlowConfig JSON must be an object, got list"),
    ("FlowMatchSchedule", "steps", 4, TypeError, "steps must be a tuple of ints in 1..1000"),
    ("FlowMatchSchedule", "steps", (), ValueError, "steps must hold at least one timestep"),
    ("FlowMatchSchedule", "steps", (1000, 0), ValueError, "steps must be ints in 1..1000, got 0"),
    ("FlowMatchSchedule", "shift", "5", TypeError, "shift must be a finite number > 0, got '5'"),
    ("FlowMatchSchedule", "shift", math.inf, ValueError, "shift must be a finite number > 0"),
    ("FlowMatchSchedule", "stochastic", 1, TypeError, "stochastic must be a bool, got 1"),
    ("PromptSchedule", "entries", "a cat", TypeError,
     "entries must be a tuple of .prompt, start_frame. tuples, got 'a cat'"),
    ("PromptSchedule", "entries", (("a cat", 3),), ValueError,
     "the first prompt must start at frame 0, got 3"),
    ("PromptSchedule.from_prompts", "prompts", "a cat", TypeError,
     "prompts must be a list of str, got the str 'a cat'"),
]


@pytest.fixture(scope="module")
def pipe():
    return MemFlowStreamingPipeline(
        build_tiny_wan_pipeline(seed=0), MemFlowConfig.reference_sma(), device="cpu"
    )


@pytest.fixture(scope="module")
def state(pipe):
    """A stream's state after its first chunk."""
    paused = pipe.stream(**GOOD, generator=torch.Generator().manual_seed(1))
    next(paused)
    return paused.state_dict()


def same(a, b) -> bool:
    """Nested states equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize(
    ("call", "argument", "value", "error", "message"), ROWS,
    ids=[f"{call}-{argument}-{i}" for i, (call, argument, *_) in enumerate(ROWS)],
)
def test_a_bad_argument_is_refused_by_name_before_anything_changes(
    pipe, state, tmp_path, monkeypatch, call, argument, value, error, message
):
    generator = torch.Generator().manual_seed(0)
    kwargs = {**GOOD, "generator": generator, argument: value}
    own = {argument: value} if call == "next(stream)" else {}
    stream = pipe.stream(**{**GOOD, **own}, generator=torch.Generator().manual_seed(1))
    before = stream.state_dict()
    calls = {
        "stream": lambda: pipe.stream(**kwargs),
        "stream(schedule)": lambda: pipe.stream(**{**kwargs, "prompt": SCHEDULE}),
        "__call__": lambda: pipe(**{"progress": False, **kwargs}),
        "next(stream)": lambda: next(stream),
        "set_prompt": lambda: stream.set_prompt(value),
        "load_state_dict": lambda: stream.load_state_dict(
            value if argument == "state" else
            {k: v for k, v in {**state, argument: value}.items() if v is not MISSING}
        ),
        "resume": lambda: pipe.resume(value),
        "save_video": lambda: StreamingVideoOutput(
            torch.zeros(1), np.zeros((1, 2, 8, 8, 3)), []
        ).save_video(tmp_path / "video.mp4", **{argument: value}),
        "MemFlowStreamingPipeline": lambda: MemFlowStreamingPipeline(
            pipe.pipe, **{"config": pipe.config, argument: value}
        ),
        "MemFlowConfig": lambda: MemFlowConfig(**{argument: value}),
        "MemFlowConfig.reference_sma": lambda: MemFlowConfig.reference_sma(**{argument: value}),
        "MemFlowConfig.from_json_file": lambda: MemFlowConfig.from_json_file(
            write(tmp_path / "config.json", value)
        ),
        "FlowMatchSchedule": lambda: FlowMatchSchedule(**{argument: value}),
        "PromptSchedule": lambda: PromptSchedule(value),
        "PromptSchedule.from_prompts": lambda: PromptSchedule.from_prompts(value, 3),
    }
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        calls[call]()
    if argument != "generator":
        assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())
    assert same(stream.state_dict(), before)


def write(path, text):
    path.write_text(text)
    return path
