"""Write a trained world adapter (the ``memory_finetune`` output: full weights, or a LoRA merged
into the world's base transformer) as the diffusers transformer folder ``load_world_pipeline``
loads (the packaged model is written this way)::

    python -m memflow_adapter.world.export --adapter outputs/world/adapter \\
        --output memflow_adapter/world/model --metrics outputs/world/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from ..hooks import remove_memflow
from ..hub import MemFlowAdapter
from .pipeline import WORLD_MEMORY, build_world_pipeline

#: Steps averaged per point of the training curve.
CURVE_WINDOW = 100


def export(adapter_dir: Path, output: Path) -> Path:
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
    return output


def plot_training_curve(stages: Sequence[Path], output: Path) -> Path:
    """The flow-matching loss (mean over ``CURVE_WINDOW`` steps) against the step, as a PNG, of
    one training run or of runs that continue each other (``stages``: their ``metrics.jsonl``,
    in order; drawn end to end, a dashed line where a stage starts)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(6, 3.5), dpi=100)
    offset = 0
    for index, metrics in enumerate(stages):
        rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
        steps, losses = [], []
        for first in range(0, len(rows) - CURVE_WINDOW + 1, CURVE_WINDOW):
            window = rows[first : first + CURVE_WINDOW]
            steps.append(offset + window[-1]["step"])
            losses.append(statistics.mean(row["student_loss"] for row in window))
        if index:
            axis.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
        axis.plot(steps, losses, color="C0")
        offset += rows[-1]["step"] if rows else 0
    axis.set_xlabel("step")
    axis.set_ylabel(f"flow-matching loss (mean of {CURVE_WINDOW} steps)")
    axis.set_title("narrative world: memory_finetune (memory active)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output)
    pyplot.close(figure)
    return output


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m memflow_adapter.world.export")
    parser.add_argument("--adapter", type=Path, required=True, help="the recipe's adapter folder")
    parser.add_argument("--output", type=Path, required=True, help="the model folder to write")
    parser.add_argument("--metrics", type=Path, nargs="+",
                        help="metrics.jsonl (one per stage of a chained training, in order): "
                        "also draw the curve PNG")
    args = parser.parse_args(argv)
    folder = export(args.adapter, args.output)
    if args.metrics:
        plot_training_curve(args.metrics, folder / "training_curve.png")
    return folder


if __name__ == "__main__":
    main()
