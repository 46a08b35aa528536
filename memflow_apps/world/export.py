"""Write a trained world adapter (a recipe's output: full weights, or a LoRA merged into the
world's base transformer) as the diffusers transformer folder ``load_world_pipeline`` loads, with
how it samples (``sampling.json``; the packaged models are written this way)::

    python -m memflow_apps.world.export --adapter outputs/world/adapter \\
        --output memflow_apps/world/model --metrics outputs/world/metrics.jsonl
    python -m memflow_apps.world.export --adapter outputs/world-student/adapter \\
        --output memflow_apps/world/student --steps 1000 750 500 250 --stochastic \\
        --guidance-scale 1 --metrics outputs/world-student/metrics.jsonl

or, for a look at a run in progress, a ``memory_finetune`` checkpoint of a model trained in full::

    python -m memflow_apps.world.export --edition v2 \\
        --checkpoint runs/world-v2/teacher/checkpoints/checkpoint-400 --output /tmp/teacher-400
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file

from memflow_adapter.hooks import remove_memflow
from memflow_adapter.hub import MemFlowAdapter
from memflow_adapter.schedule import FlowMatchSchedule

from .grammar import DEFAULT_EDITION, EDITIONS
from .pipeline import WORLD_MEMORY, WORLD_SCHEDULE, WorldSampling, build_world_pipeline

#: Steps averaged per point of the training curve.
CURVE_WINDOW = 100
#: What a ``memory_finetune`` checkpoint calls the weights of its student trained in full.
CHECKPOINT_WEIGHTS = "student_weights.safetensors"


def export(adapter_dir: Path, output: Path, sampling: WorldSampling | None = None) -> Path:
    """Merge ``adapter_dir`` into the world's base transformer, save it in ``output`` with its
    ``sampling`` (default: the packaged many-step model's)."""
    adapter = MemFlowAdapter.from_pretrained(adapter_dir)
    if adapter.config != WORLD_MEMORY:
        raise ValueError(
            f"adapter {adapter_dir} was trained with {adapter.config}, the world model streams "
            f"with {WORLD_MEMORY}"
        )
    transformer = build_world_pipeline().transformer
    adapter.apply_to(transformer, merge_lora=True)
    remove_memflow(transformer)
    transformer.save_pretrained(output)
    (sampling or WorldSampling()).save(output)
    return output


def export_checkpoint(
    checkpoint: Path, output: Path, sampling: WorldSampling | None = None
) -> Path:
    """Save the world transformer of a ``memory_finetune`` checkpoint folder (a model trained in
    full: ``student_weights.safetensors``, every weight) in ``output`` with its ``sampling``."""
    weights = Path(checkpoint) / CHECKPOINT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"--checkpoint {checkpoint}: no {CHECKPOINT_WEIGHTS} (a memory_finetune checkpoint of "
            f"a world model trained with model.train: full)"
        )
    transformer = build_world_pipeline().transformer
    transformer.load_state_dict(load_file(weights), strict=True)
    transformer.save_pretrained(output)
    (sampling or WorldSampling()).save(output)
    return output


def plot_training_curve(
    stages: Sequence[Path], output: Path, window: int = CURVE_WINDOW,
    title: str = "narrative world: memory_finetune (memory active)",
) -> Path:
    """The losses (means over ``window`` logged steps) against the step, as a PNG, of one
    training run or of runs that continue each other (``stages``: their ``metrics.jsonl``, in
    order; drawn end to end, a dashed line where a stage starts): memory_finetune's
    flow-matching loss, or streaming_long_tuning's DMD (student) and critic losses."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(6, 3.5), dpi=100)
    offset = 0
    for index, metrics in enumerate(stages):
        rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
        for colour, (key, label) in enumerate(_losses(rows).items()):
            logged = [row for row in rows if key in row]
            steps, losses = [], []
            for first in range(0, len(logged) - window + 1, window):
                part = logged[first : first + window]
                steps.append(offset + part[-1]["step"])
                losses.append(statistics.mean(row[key] for row in part))
            axis.plot(steps, losses, color=f"C{colour}", label=label if not index else None)
        if index:
            axis.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
        offset += rows[-1]["step"] if rows else 0
    axis.set_xlabel("step")
    axis.set_ylabel(f"loss (mean of {window} logged steps)")
    axis.set_title(title)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output)
    pyplot.close(figure)
    return output


def _losses(rows: list[dict]) -> dict[str, str]:
    """The loss columns of a ``metrics.jsonl`` and their labels."""
    if any("critic_loss" in row for row in rows):
        return {"student_loss": "student (DMD surrogate)", "critic_loss": "critic (flow matching)"}
    return {"student_loss": "flow matching"}


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m memflow_apps.world.export")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", type=Path, help="the recipe's adapter folder")
    source.add_argument("--checkpoint", type=Path,
                        help="a memory_finetune checkpoint folder of a model trained in full")
    parser.add_argument("--output", type=Path, required=True, help="the model folder to write")
    parser.add_argument("--metrics", type=Path, nargs="+",
                        help="metrics.jsonl (one per stage of a chained training, in order): "
                        "also draw the curve PNG")
    parser.add_argument("--steps", type=int, nargs="+", default=list(WORLD_SCHEDULE.steps),
                        help="the model's sampling steps (default: the many-step model's)")
    parser.add_argument("--shift", type=float, default=WORLD_SCHEDULE.shift)
    parser.add_argument("--stochastic", action="store_true",
                        help="re-noise with fresh noise between steps (a distilled few-step "
                        "model); default deterministic flow-matching steps")
    parser.add_argument("--guidance-scale", type=float, default=WorldSampling.guidance_scale,
                        help="the model's classifier-free guidance (1: none)")
    parser.add_argument("--curve-window", type=int, default=CURVE_WINDOW,
                        help="logged steps averaged per point of the curve")
    parser.add_argument("--title", default="narrative world: memory_finetune (memory active)")
    parser.add_argument("--edition", choices=sorted(EDITIONS), default=DEFAULT_EDITION,
                        help="the world edition the model was trained on (its scripts)")
    args = parser.parse_args(argv)
    try:
        sampling = WorldSampling(
            FlowMatchSchedule(tuple(args.steps), args.shift, args.stochastic),
            args.guidance_scale,
            args.edition,
        )
    except ValueError as error:
        parser.error(str(error))
    if args.checkpoint is not None:
        folder = export_checkpoint(args.checkpoint, args.output, sampling)
    else:
        folder = export(args.adapter, args.output, sampling)
    if args.metrics:
        plot_training_curve(args.metrics, folder / "training_curve.png", args.curve_window,
                            args.title)
    return folder


if __name__ == "__main__":
    main()
