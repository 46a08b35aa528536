"""The memories ``memflow compare`` runs side by side on one base model, and its report.

A memory is named ``"<bank policy>"`` (that policy's bank, every memory frame attended),
``"<bank policy>+<activation policy>"`` (the bank, and SMA with that activation policy) or
``"none"`` (the sink and the window only), on one base layout (a config with a bank).
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memflow_adapter.config import MemFlowConfig
from memflow_adapter.extras import import_optional
from memflow_adapter.policies import ACTIVATION_POLICIES, BANK_POLICIES

#: The memory without a bank.
NO_BANK = "none"


#: What ``memflow compare`` runs by default: every built-in bank policy with dense attention, NAM
#: with SMA, and no bank.
DEFAULT_MEMORIES = ("nam", "nam_no_sink", "recency", "uniform", "visual", "nam+sma", NO_BANK)


def memory_config(layout: MemFlowConfig, name: str) -> MemFlowConfig:
    """``layout`` with the memory ``name`` (see the module docstring); SMA keeps the layout's
    ``sma_top_k``."""
    if not layout.nam:
        raise ValueError(
            f"the base layout must have a memory bank (nam=True) for memories to be compared, "
            f"got {layout.describe()}"
        )
    if name == NO_BANK:
        return dataclasses.replace(
            layout, nam=False, bank_frames=0, sma=False, bank_policy=MemFlowConfig.bank_policy,
            activation_policy=MemFlowConfig.activation_policy,
        )
    bank, plus, activation = name.partition("+")
    if bank not in BANK_POLICIES or (plus and activation not in ACTIVATION_POLICIES):
        raise ValueError(
            f"a memory must be {NO_BANK!r}, a bank policy {sorted(BANK_POLICIES)} or "
            f"'<bank policy>+<activation policy>' with an activation policy of "
            f"{sorted(ACTIVATION_POLICIES)}, got {name!r}"
        )
    return dataclasses.replace(
        layout, sma=bool(plus), bank_policy=bank,
        activation_policy=activation or MemFlowConfig.activation_policy,
    )


@dataclass(frozen=True)
class Column:
    """One column of the comparison: a row key, its header, and how its values print
    (``"percent"``: a rate in 0..1 shown in %, ``"ms"``: seconds shown in milliseconds,
    ``"kib"``: bytes shown in KiB, ``"plain"``: two decimals; ``None``: n/a)."""

    key: str
    header: str
    unit: str

    def format(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        if self.unit == "plain":
            return f"{value:.2f}"
        if self.unit == "percent":
            return f"{100 * value:.0f}"
        if self.unit == "ms":
            return f"{1000 * value:.1f}"
        return f"{value / 1024:.0f}"


def comparison_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A markdown table: one row per memory (``row["memory"]``), one column per ``columns``."""
    lines = ["| memory | " + " | ".join(c.header for c in columns) + " |",
             "| --- " * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [column.format(row[column.key]) for column in columns]
        lines.append(f"| {row['memory']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_comparison(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    plotted: Sequence[Column],
    title: str,
    output_dir: str | os.PathLike[str],
    details: dict[str, Any],
) -> dict[str, Path]:
    """Print ``title`` and the table, and write ``comparison.md`` (the same), ``comparison.json``
    (the rows and ``details``) and ``comparison.png`` (the ``plotted`` rate columns as grouped
    bars) into ``output_dir``; returns their paths."""
    table = comparison_markdown(rows, columns)
    print(f"{title}\n{table}", end="")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / f"comparison.{name}" for name in ("md", "json", "png")}
    paths["md"].write_text(f"{title}\n\n{table}")
    paths["json"].write_text(json.dumps({"title": title, **details, "rows": list(rows)},
                                        indent=2) + "\n")
    _plot(rows, plotted, title, paths["png"])
    return paths


def _plot(rows: Sequence[dict[str, Any]], plotted: Sequence[Column], title: str,
          path: Path) -> None:
    purpose = "drawing the comparison"
    Figure = import_optional("matplotlib.figure", "video", purpose).Figure
    canvas = import_optional("matplotlib.backends.backend_agg", "video", purpose)
    figure = Figure(figsize=(1.5 + 1.1 * len(rows), 3.6), layout="constrained")
    canvas.FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(plotted)
    for index, column in enumerate(plotted):
        positions = [r + (index - (len(plotted) - 1) / 2) * width for r in range(len(rows))]
        axes.bar(positions, [100 * row[column.key] for row in rows], width, label=column.header)
    axes.set_xticks(range(len(rows)), [row["memory"] for row in rows], rotation=20)
    axes.set_ylabel("%")
    axes.set_ylim(0, 100)
    axes.set_title(textwrap.fill(title, 90), fontsize=8)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.savefig(path, format="png", dpi=100)
