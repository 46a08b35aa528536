"""A world model's held-out benchmark, kept beside its weights as ``heldout.json``: what
``bench/narrative_eval.py --json`` writes for that model alone, on stories never used to train or
tune it. ``memflow demo`` streams the benchmark's first story (a rule, not a story picked because
memory wins on it) and prints the benchmark's rates beside it, so that one story is seen against
the aggregate."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: The file beside a world model's weights.
HELDOUT_FILE = "heldout.json"
#: The rates ``memflow demo`` prints per layout (``mean_scores`` keys -> what they say).
SUMMARY_RATES = {
    "return_looks": "returning entity as first seen",
    "return_colour": "its colour",
    "first_looks": "first drawn as prompted",
    "adherence": "prompt adherence",
}


@dataclass(frozen=True)
class HeldOutBenchmark:
    """One model's held-out benchmark: its story ``seeds`` and, per memory layout, the mean
    scores (``memflow_apps.world.scoring.mean_scores``: rates in ``[0, 1]``)."""

    seeds: range
    layouts: dict[str, dict[str, float]]

    @classmethod
    def read(cls, model: Path) -> HeldOutBenchmark:
        """The benchmark of the model folder ``model`` (its ``heldout.json``)."""
        path = Path(model) / HELDOUT_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{model} has no {HELDOUT_FILE} (its held-out benchmark: bench/narrative_eval.py "
                f"--models {model} --json {path}); pass --script to pick a story"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            first, last = data["seeds"]
            models, layouts = data["models"], data["layouts"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{path} is not a bench/narrative_eval.py --json benchmark ({error})"
            ) from error
        if len(models) != 1:
            raise ValueError(f"{path} scores {len(models)} models; a model's benchmark scores it "
                             "alone")
        missing = [rate for rate in SUMMARY_RATES
                   if any(rate not in scores for scores in layouts.values())]
        if not layouts or missing:
            raise ValueError(f"{path} lacks the rates {missing or list(SUMMARY_RATES)}")
        return cls(range(first, last + 1), layouts)

    @property
    def demo_story(self) -> int:
        """The story ``memflow demo`` streams by default: the benchmark's first."""
        return self.seeds.start

    def summary(self) -> list[str]:
        """The benchmark's rates as lines of a Markdown table, a row per layout."""
        header = ["layout", *SUMMARY_RATES.values()]
        lines = ["| " + " | ".join(header) + " |", "| --- " * len(header) + "|"]
        for layout, scores in self.layouts.items():
            cells = [f"{100 * scores[rate]:.0f}%" for rate in SUMMARY_RATES]
            lines.append(f"| {layout} | " + " | ".join(cells) + " |")
        return lines
