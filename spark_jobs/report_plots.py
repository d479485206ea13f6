"""The report's plots (`reports/<version>/*.png`), one function per figure.

Every figure names the model version in its title, so a PNG opened on its own (the console,
a chat message, a ticket) still says which run it shows. The functions return the
matplotlib figure and `save` writes it, so tests can read titles, lines and scales.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spark_jobs.gate import popularity_bar

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PANELS = ("ndcg", "recall", "map", "coverage")
LOG_FLOOR = 1e-4
"""Lowest share shown on the log-scale decile plot (a share of 0 has no place on it)."""


@dataclass(frozen=True)
class GateLine:
    """The bar the gate metric must clear: popularity x (1 + min_lift_over_popularity)."""

    metric: str
    """e.g. `ndcg@10`."""
    threshold: float
    label: str

    @property
    def panel(self) -> str:
        return self.metric.split("@")[0]

    @property
    def k(self) -> int:
        return int(self.metric.split("@")[1])


def gate_line(metric: str, popularity: Mapping[str, float] | None,
              min_lift: float) -> GateLine | None:
    """The gate's threshold on `metric`, or None when popularity has no such metric."""
    if not popularity or metric not in popularity or "@" not in metric:
        return None
    need = popularity_bar(float(popularity[metric]), min_lift)
    return GateLine(metric, need, f"gate: popularity x (1 + {min_lift:g}) = {need:.4f}")


def _figure(**kwargs: Any) -> Figure:
    """A figure outside pyplot: no global figure registry to close and no GUI backend to
    choose (jobs and tests have no display); `Figure.savefig` renders PNG with Agg."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def metrics_vs_k(metrics: Mapping[str, Mapping[str, float]], ks: Sequence[int], *,
                 version: str, gate: GateLine | None = None) -> Figure:
    """NDCG / recall / MAP / coverage at each cut-off, one line per model; the gate's
    threshold as a dashed line (and a marker at its cut-off) on its metric's panel."""
    ks = sorted(ks)
    fig = _figure(figsize=(16, 3.9))
    axes = fig.subplots(1, len(PANELS))
    for ax, panel in zip(axes, PANELS, strict=True):
        for name, m in metrics.items():
            ax.plot(ks, [m[f"{panel}@{k}"] for k in ks], marker="o", label=name)
        if gate is not None and gate.panel == panel:
            ax.axhline(gate.threshold, color="crimson", linestyle="--", linewidth=1,
                       label=gate.label)
            ax.plot([gate.k], [gate.threshold], marker="x", color="crimson", markersize=9)
        ax.set_xlabel("k")
        ax.set_title(f"{panel}@k")
        ax.grid(alpha=0.3)
        if gate is not None and gate.panel == panel:
            ax.legend(fontsize=8)
    if gate is None or gate.panel != PANELS[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"model {version}: metrics vs k"
                 + (f" (gate on {gate.metric})" if gate is not None else ""))
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.85, wspace=0.25)
    return fig


def popularity_deciles(deciles: Mapping[str, np.ndarray], k: int, *, version: str) -> Figure:
    """Share of each model's top-k recommendations per item-popularity decile, on a log
    scale: a model that puts 87% of its slots in the most popular decile and 0.1% in the
    tail shows both (a linear axis flattens the tail to nothing). The title gives each
    model's share from the most popular decile."""
    names = list(deciles)
    fig = _figure(figsize=(7.5, 3.9))
    ax = fig.subplots()
    width = 0.8 / max(1, len(names))
    lowest = LOG_FLOOR
    for j, n in enumerate(names):
        shares = np.asarray(deciles[n], dtype=np.float64)
        ax.bar(np.arange(10) + j * width, np.where(shares > 0, shares, np.nan), width=width,
               label=n)
        if (shares > 0).any():
            lowest = min(lowest, float(shares[shares > 0].min()) / 2)
    ax.set_yscale("log")
    ax.set_ylim(lowest, 1.0)
    ax.set_xticks(np.arange(10) + 0.4 - width / 2,
                  [f"{10 * d}-{10 * d + 10}%" for d in range(10)], rotation=45, fontsize=8)
    ax.set_xlabel("item popularity decile (most popular first)")
    ax.set_ylabel(f"share of top-{k} (log scale)")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    top = ", ".join(f"{n} {100 * float(deciles[n][0]):.0f}%" for n in names)
    fig.suptitle(f"model {version}: top-{k} per item-popularity decile\n"
                 f"from the most popular 10% of items: {top}", fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.25, top=0.85)
    return fig


def trials(points: Mapping[str, Sequence[tuple[int, float]]], metric: str, *, version: str,
           chosen: tuple[int, float] | None = None) -> Figure:
    """The recipe search: validation metric per trial, coloured by stage, the chosen one
    circled."""
    fig = _figure(figsize=(7, 3.6))
    ax = fig.subplots()
    for stage, pts in points.items():
        if pts:
            ax.scatter(*zip(*pts, strict=True), label=stage)
    if chosen is not None:
        ax.scatter([chosen[0]], [chosen[1]], s=160, facecolors="none", edgecolors="black",
                   label="chosen")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"model {version}: recipe search ({sum(len(p) for p in points.values())} "
                 "trials)", fontsize=10)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write `fig` as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path
