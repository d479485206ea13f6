"""Report plots: the model version in every title, the gate's threshold line, the popularity
deciles on a log scale with the most-popular-decile share spelled out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spark_jobs import report_plots as rp

KS = [5, 10, 20]


def _metrics(base: float) -> dict[str, float]:
    return {f"{m}@{k}": base * (1 + k / 100) for m in rp.PANELS for k in KS}


def test_gate_line_is_popularity_times_the_margin() -> None:
    line = rp.gate_line("ndcg@10", {"ndcg@10": 0.2}, 0.1)
    assert line is not None
    assert line.threshold == pytest.approx(0.22)
    assert (line.panel, line.k) == ("ndcg", 10)
    assert line.label == "gate: popularity x (1 + 0.1) = 0.2200"
    assert rp.gate_line("ndcg@10", None, 0.1) is None


def test_metrics_plot_names_the_version_and_draws_the_gate_threshold(tmp_path: Path) -> None:
    gate = rp.gate_line("recall@10", _metrics(0.2), 0.1)
    fig = rp.metrics_vs_k({"als": _metrics(0.3), "popularity": _metrics(0.2)}, KS,
                          version="v20261201-abcd0123", gate=gate)
    assert fig.get_suptitle() == ("model v20261201-abcd0123: metrics vs k "
                                       "(gate on recall@10)")
    panels = {ax.get_title(): ax for ax in fig.axes}
    dashed = [ln for ln in panels["recall@k"].get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1
    assert dashed[0].get_ydata()[0] == pytest.approx(0.2 * 1.1 * 1.1)  # popularity@10 x 1.1
    assert dashed[0].get_label().startswith("gate: popularity x (1 + 0.1)")
    assert not [ln for ln in panels["ndcg@k"].get_lines() if ln.get_linestyle() == "--"]
    assert rp.save(fig, tmp_path / "m.png").stat().st_size > 1000


def test_popularity_deciles_on_a_log_scale_show_the_top_decile_share() -> None:
    als = np.array([0.87, 0.1, 0.02, 0.005, 0.003, 0.001, 0.001, 0, 0, 0])
    pop = np.array([1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    fig = rp.popularity_deciles({"als": als, "popularity": pop}, 10, version="v1")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert low <= 0.001 / 2 and high == 1.0  # the 0.1% deciles are visible
    assert fig.get_suptitle() == ("model v1: top-10 per item-popularity decile\n"
                                   "from the most popular 10% of items: als 87%, "
                                   "popularity 100%")


def test_trials_plot_names_the_version_and_circles_the_chosen_trial() -> None:
    fig = rp.trials({"defaults": [(0, 0.1)], "als": [(1, 0.12), (2, 0.11)]}, "ndcg@10",
                    version="v7", chosen=(1, 0.12))
    assert fig.get_suptitle() == "model v7: recipe search (3 trials)"
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["defaults", "als", "chosen"]
