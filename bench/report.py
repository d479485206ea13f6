"""Collects benchmark figures, prints one JSON object per line, writes report.md + plots."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    reference_name: str
    reference_value: float
    ratio: float | None = field(init=False)
    """value / reference_value: what the figure is worth against the same-run reference."""

    def __post_init__(self) -> None:
        ref = self.reference_value
        self.ratio = round(self.value / ref, 4) if ref else None  # None: JSON has no NaN


class Report:
    def __init__(self, out_dir: Path | None = None) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.dir = out_dir or RESULTS_DIR / stamp
        self.dir.mkdir(parents=True, exist_ok=True)
        self.figures: list[Figure] = []
        self.sections: list[tuple[str, str]] = []
        self.plots: list[tuple[str, str]] = []

    def add(self, name: str, value: float, unit: str, reference_name: str,
            reference_value: float) -> Figure:
        fig = Figure(name, float(value), unit, reference_name, float(reference_value))
        self.figures.append(fig)
        print(json.dumps(asdict(fig)), flush=True)
        return fig

    def note(self, title: str, markdown: str) -> None:
        self.sections.append((title, markdown))

    def plot(self, filename: str, caption: str, draw: Any) -> None:
        """`draw(ax)` draws on a fresh matplotlib axis; saved as PNG next to the report."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        draw(ax)
        fig.tight_layout()
        fig.savefig(self.dir / filename, dpi=110)
        plt.close(fig)
        self.plots.append((filename, caption))

    def write(self) -> Path:
        lines = [
            "# lambdarec benchmark report",
            "",
            f"- when: {datetime.now(UTC).isoformat(timespec='seconds')}",
            f"- machine: {platform.machine()}, {_cpus()} CPUs, Python {sys.version.split()[0]}",
            "",
            "Every figure stands next to a reference measured in the same run; the ratio is",
            "value / reference (absolute times on a shared 2-core box are noisy, ratios hold).",
            "",
            "| figure | value | unit | reference | reference value | ratio |",
            "|---|---:|---|---|---:|---:|",
        ]
        for f in self.figures:
            ratio = "-" if f.ratio is None else format(f.ratio, ".3g")
            lines.append(f"| {f.name} | {f.value:.4g} | {f.unit} | {f.reference_name} | "
                         f"{f.reference_value:.4g} | {ratio} |")
        for title, md in self.sections:
            lines += ["", f"## {title}", "", md]
        for filename, caption in self.plots:
            lines += ["", f"![{caption}]({filename})", f"*{caption}*"]
        path = self.dir / "report.md"
        path.write_text("\n".join(lines) + "\n")
        return path


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
