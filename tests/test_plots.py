"""Tests of lora_bench.report.figures: every figure renders from tiny tables (1 and 3 seeds) and skips failed runs."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from synthetic import FamilySpec, make_tables, memory_time_family

from lora_bench.report import figures

KINDS = ("methods", "rank_alpha", "coverage", "epochs", "optimizer", "memory_time")
GPU = "cuda:0 (NVIDIA H100 80GB HBM3)"


@pytest.fixture(scope="module")
def small_tables():
    return {n: make_tables(KINDS, n_seeds=n, n_epochs=2) for n in (1, 3)}


@pytest.mark.parametrize("n_seeds", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_each_figure_renders_and_saves(small_tables, tmp_path, kind, n_seeds):
    runs, metrics = small_tables[n_seeds]
    fig = figures.FIGURES[kind](runs, metrics, kind)
    try:
        png, svg = figures.save_figure(fig, tmp_path / kind)
    finally:
        plt.close(fig)
    assert png.stat().st_size > 1000 and svg.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:2000]


def test_generic_and_unknown_kinds_fall_back(tmp_path):
    spec = FamilySpec(name="mystery", kind="something_new", variants=("a", "b"))
    runs, metrics = make_tables([spec], n_seeds=2)
    assert figures.figure_function("something_new") is figures.plot_generic
    made = figures.make_all_figures(runs, metrics, tmp_path)
    assert [m["kind"] for m in made] == ["something_new"] and made[0]["png"].exists()


def test_failed_runs_are_skipped(tmp_path):
    runs, metrics = make_tables(["methods"], n_seeds=2, failed=["methods/full/seed0", "methods/full/seed1"])
    # All runs of "full" failed and left only epoch-1 rows: the figure must leave it out, not crash.
    fig = figures.plot_methods(runs, metrics, "methods")
    try:
        labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    finally:
        plt.close(fig)
    assert "full" not in labels and "lora" in labels


def test_family_with_only_failed_runs_still_gets_a_figure(tmp_path):
    runs, metrics = make_tables(
        ["coverage"],
        n_seeds=1,
        failed=[f"coverage/{v}/seed0" for v in ("query+value", "query+key+value", "attention", "all_linear")],
    )
    made = figures.make_all_figures(runs, metrics, tmp_path)
    assert made[0]["png"].stat().st_size > 0 and made[0]["svg"].stat().st_size > 0


def test_make_all_figures_lists_every_family_in_order(small_tables, tmp_path):
    runs, metrics = small_tables[1]
    made = figures.make_all_figures(runs, metrics, tmp_path)
    assert [m["family"] for m in made] == list(KINDS)
    for entry in made:
        assert entry["png"] == tmp_path / f"{entry['family']}.png" and entry["svg"].exists()
        assert entry["caption"] and "\n" not in entry["caption"]
    assert not plt.get_fignums()  # figures are closed after saving


def test_rank_alpha_facets_by_scaling(tmp_path):
    runs, metrics = make_tables(["rank_alpha"], n_seeds=1)
    flip = runs["variant"].isin(["r4_a8", "r8_a8", "r16_a8"])
    runs.loc[flip, "cfg.method.lora.scaling"] = "alpha"
    fig = figures.plot_rank_alpha(runs, metrics, "rank_alpha")
    try:
        heatmaps = [ax for ax in fig.axes if ax.get_xlabel() == "alpha"]
    finally:
        plt.close(fig)
    assert len(heatmaps) == 2


def _render(fig, path):
    try:
        png, svg = figures.save_figure(fig, path)
        labels = [ax.get_xlabel() for ax in fig.axes]
    finally:
        plt.close(fig)
    assert png.stat().st_size > 1000 and svg.stat().st_size > 1000
    return labels


@pytest.mark.parametrize("n_seeds", [1, 3])
@pytest.mark.parametrize("device", ["cpu", GPU])
def test_memory_time_figure(tmp_path, n_seeds, device):
    assert figures.FIGURES["memory_time"] is figures.plot_memory_time
    runs, metrics = make_tables(["memory_time"], n_seeds=n_seeds, device=device)
    labels = _render(figures.plot_memory_time(runs, metrics, "memory_time"), tmp_path / "memory_time")
    memory = "peak CUDA allocated" if device == GPU else "weights + grads + optimizer"
    assert labels[0].startswith(f"memory: {memory} (GiB)")
    assert labels[1].startswith("base weights (MiB")


def test_memory_time_figure_points_and_log_scale(tmp_path):
    runs, metrics = make_tables(["memory_time"], n_seeds=3, device=GPU, memory_time_planted={
        "lora": (1.0, 1.0, 1.0), "qlora": (0.6, 1.3, 0.01), "full": (3.0, 1.15, 1.0)})  # fmt: skip
    fig = figures.plot_memory_time(runs, metrics, "memory_time")
    try:
        scatter, bars = fig.axes[:2]
        annotations = [t.get_text() for t in scatter.texts]
        scale = bars.get_xscale()
        legend = [t.get_text() for t in scatter.get_legend().get_texts()]
    finally:
        plt.close(fig)
    assert annotations == ["lora (n=3)", "qlora (n=3)", "full (n=3)"]
    assert legend == ["lora", "qlora", "full"]
    assert scale == "log"  # base weights span a factor of 100


def test_memory_time_figure_without_successful_runs(tmp_path):
    spec = memory_time_family()
    failed = [f"memory_time/{v}/seed0" for v in spec.variants]
    runs, metrics = make_tables([spec, "methods"], n_seeds=1, failed=failed)
    _render(figures.plot_memory_time(runs, metrics, "memory_time"), tmp_path / "memory_time")
