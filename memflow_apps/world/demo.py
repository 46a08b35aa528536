"""``memflow demo --model world``: a trained narrative-world model streams a six-prompt story in
which an entity leaves and comes back, with a memory layout; writes the mp4 (frames enlarged for
viewing), the memory timeline and a report with the detectors' scores, and prints the scores of
the same story under every layout for comparison."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memflow_adapter.config import MemFlowConfig
from memflow_adapter.outputs import write_outputs
from memflow_adapter.pipeline import MemFlowStreamingPipeline

from .grammar import Script, make_script
from .heldout import HELDOUT_FILE, HeldOutBenchmark
from .pipeline import (
    WORLD_MODEL_DIR,
    WORLD_SEQUENCE_LENGTH,
    WORLD_STUDENT_DIR,
    load_world_pipeline,
)
from .render import HEIGHT, WIDTH
from .scoring import WORLD_LAYOUTS, generate_script, score_script, streaming_world

#: The model ``memflow demo`` (and ``make demo``) streams by default: the better of the two
#: packaged models on the benchmark (README.md), and the other one.
WORLD_DEMO_MODEL = WORLD_MODEL_DIR
WORLD_OTHER_MODEL = WORLD_STUDENT_DIR
#: Why the default is the default, printed by the demo.
WORLD_DEMO_CHOICE = (
    "the 10-step guided model; the distilled 4-step student is 3.4x faster but its memory keeps "
    "less (returning colour 12% vs 30% of 50 held-out stories, bench/narrative_eval.py)"
)
#: Nearest-neighbour enlargement of the 32x32 frames in the mp4.
VIDEO_SCALE = 8
#: The model ``memflow live`` streams by default: the distilled 4-step student, which a CPU makes
#: faster than it plays (bench/live_latency.py).
WORLD_LIVE_MODEL = WORLD_STUDENT_DIR


@dataclass(frozen=True)
class LiveWorld:
    """A world model ready to stream live: the pipeline, the sizes and guidance it samples at,
    and the prompts of its held-out benchmark's first story (the first opens the video, all are
    offered)."""

    streaming: MemFlowStreamingPipeline
    height: int
    width: int
    max_sequence_length: int
    guidance_scale: float
    prompts: tuple[str, ...]


def live_world(
    layout: str, cache_dtype: str | None = None, model: Path = WORLD_LIVE_MODEL
) -> LiveWorld:
    """``model`` (default: the packaged student) streamed with the world layout ``layout``
    (``WORLD_LAYOUTS``) and a ``cache_dtype`` cache (``None``: the model dtype)."""
    if layout not in WORLD_LAYOUTS:
        raise ValueError(
            f"--config must be one of {sorted(WORLD_LAYOUTS)} for the world model, got {layout!r}"
        )
    pipe = load_world_pipeline(model)
    overrides = {"cache_dtype": cache_dtype} if cache_dtype else {}
    script = make_script(HeldOutBenchmark.read(model).demo_story, pipe.sampling.edition)
    return LiveWorld(streaming_world(pipe, layout, **overrides), HEIGHT, WIDTH,
                     WORLD_SEQUENCE_LENGTH, pipe.sampling.guidance_scale, tuple(script.prompts))


def run_world_demo(
    model: Path,
    layout: str,
    script_seed: int | None,
    seed: int | None,
    output_dir: Path,
    fps: int,
    guidance_scale: float | None = None,
    cache_dtype: str | None = None,
) -> int:
    """Stream held-out story ``script_seed`` (``None``: the first of the model's held-out
    benchmark, ``heldout.py``) with noise ``seed`` (``None``: the story's, as the benchmark's)
    under every world layout (``layout`` shown and written), each with a ``cache_dtype`` cache
    (``None``: the model dtype), at ``guidance_scale`` (``None``: the model's own); prints the
    benchmark's rates beside the story's scores; returns 0."""
    if layout not in WORLD_LAYOUTS:
        raise ValueError(
            f"--config must be one of {sorted(WORLD_LAYOUTS)} for the world model, got {layout!r}"
        )
    if script_seed is not None and not 0 <= script_seed < 1000:
        raise ValueError(f"--script must be a held-out script seed in 0..999, got {script_seed}")
    if guidance_scale is not None and not 1.0 <= guidance_scale < math.inf:
        raise ValueError(
            f"--guidance-scale must be >= 1 and finite (1 disables guidance), got {guidance_scale}"
        )
    pipe = load_world_pipeline(model)
    benchmark = None
    if script_seed is None or (Path(model) / HELDOUT_FILE).is_file():
        benchmark = HeldOutBenchmark.read(model)
    if script_seed is None:
        script_seed = benchmark.demo_story
        choice = (f"the first of the {len(benchmark.seeds)} stories of this model's held-out "
                  f"benchmark, seeds {benchmark.seeds.start}..{benchmark.seeds.stop - 1}, never "
                  f"used to train or tune it ({HELDOUT_FILE}): a rule, not a pick")
    else:
        choice = "chosen with --script"
    seed = script_seed if seed is None else seed
    if guidance_scale is None:
        guidance_scale = pipe.sampling.guidance_scale
    script = make_script(script_seed, pipe.sampling.edition)
    overrides = {"cache_dtype": cache_dtype} if cache_dtype else {}
    configs = {name: dataclasses.replace(config, **overrides)
               for name, config in WORLD_LAYOUTS.items()}
    print(f"memflow demo: the narrative-world model {model} (a 1.6M-parameter Wan transformer; "
          f"{_which(model)}), sampled with {len(pipe.sampling.schedule.steps)} steps at "
          f"guidance scale {guidance_scale:g}. Held-out story {script_seed} ({choice}), "
          f"streamed with the world's {layout!r} memory layout ({configs[layout].describe()}; "
          "the world's own sizes, not the paper's):")
    for index, prompt in enumerate(script.prompts, start=1):
        print(f"  {index}. {prompt}")
    scores = {}
    for name in [layout, *(other for other in WORLD_LAYOUTS if other != layout)]:
        streaming = streaming_world(pipe, name, **overrides)
        generated = generate_script(streaming, script, seed, guidance_scale)
        scores[name] = score_script(script, generated.video, generated.chunk_seconds)
        if name == layout:
            shown = generated
    result = dataclasses.replace(shown.output, frames=_enlarged(shown.video)[None])
    report = _report(model, script, script_seed, layout, configs[layout], scores)
    sampling = {"seed": seed, "guidance_scale": guidance_scale,
                "steps": list(pipe.sampling.schedule.steps)}
    paths = write_outputs(result, configs[layout], output_dir, fps, {**report, **sampling})
    print(f"returning entity: {script.returning.name} = {script.returning.description}")
    print("the same story under every world layout (return = first look: back as it looked at "
          "its first appearance in this video; return = script: back as the script describes "
          "it; place back: the opening's place returns):")
    print("| layout | sizes | adherence % | return = first look | return = script | place back |")
    for name, score in scores.items():
        print(f"| {name} | {configs[name].describe()} | {100 * score.adherence:.0f} | "
              f"{score.return_looks} | "
              f"{score.return_truth} | {score.return_place} |")
    if benchmark is None:
        print(f"no held-out benchmark for this model ({HELDOUT_FILE}): one story says little "
              "about how often memory brings the entity back")
    else:
        print(f"one story says little: on all {len(benchmark.seeds)} stories of the model's "
              f"held-out benchmark (seeds {benchmark.seeds.start}..{benchmark.seeds.stop - 1}, "
              f"{HELDOUT_FILE}, rates):")
        for line in benchmark.summary():
            print(line)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _which(model: Path) -> str:
    """Which of the packaged models ``model`` is, and why it is (or is not) the default."""
    if model.resolve() == WORLD_DEMO_MODEL.resolve():
        return f"the default: {WORLD_DEMO_CHOICE}"
    if model.resolve() == WORLD_OTHER_MODEL.resolve():
        return f"the other packaged model; the default is {WORLD_DEMO_MODEL.name}/"
    return "a model of your own"


def _enlarged(video) -> np.ndarray:
    """``[F, 3, H, W]`` in ``[-1, 1]`` -> ``[F, s*H, s*W, 3]`` float in ``[0, 1]``."""
    frames = ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return frames.repeat(VIDEO_SCALE, axis=1).repeat(VIDEO_SCALE, axis=2)


def _report(
    model: Path, script: Script, script_seed: int, layout: str, config: MemFlowConfig,
    scores: dict,
) -> dict:
    return {
        "model": f"narrative world ({model})",
        "random_weights": False,
        "script_seed": script_seed,
        "layout": layout,
        "layout_sizes": config.describe(),
        "prompts": script.prompts,
        "returning_entity": dataclasses.asdict(script.returning),
        "scores": {name: dataclasses.asdict(score) for name, score in scores.items()},
    }
