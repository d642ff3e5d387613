"""Figures of the study, one function per family kind: tables in, matplotlib figure out.

Every function takes the tidy ``runs`` and ``metrics`` tables (``docs/tables.md``) and a family name and
returns a ``Figure``; ``save_figure`` writes it as PNG and SVG. Means and 95 % intervals come from
``lora_bench.analysis.summary.summarize`` so the figures show the same numbers as the report's tables (seaborn's
own bootstrap would draw slightly different intervals). Failed runs are left out; a condition with a
single run is drawn as a point without an interval.

``FIGURES`` maps a family kind to its function; a new kind is one entry there, and the first paragraph
of the function's docstring becomes the figure's caption. Kinds without an entry get ``plot_generic``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

# Figures are built in workers and CI with no display; Agg needs none.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lora_bench.analysis import cost, tuning, variance  # noqa: E402
from lora_bench.analysis.claims import epoch_curve_variants  # noqa: E402
from lora_bench.analysis.columns import cfg
from lora_bench.analysis.summary import family_order, select_values, summarize, summarize_epochs  # noqa: E402
from lora_bench.atomic import replace_atomically  # noqa: E402

PNG_DPI = 150
STYLE = "whitegrid"
PALETTE = "colorblind"
LORA_RANK = cfg("method.lora.rank")
LORA_ALPHA = cfg("method.lora.alpha")
LORA_SCALING = cfg("method.lora.scaling")
MEMORY_METRICS = ("peak_cuda_allocated", "peak_rss")  # first one present wins: GPU runs report both


# ----------------------------------------------------------------------------------------------------
# Table helpers


def _family_metrics(metrics: pd.DataFrame, family: str) -> pd.DataFrame:
    return metrics[metrics["family"] == family]


def variant_order(runs: pd.DataFrame, family: str) -> list[str]:
    """Variants in config order, the baseline first so every panel reads 'baseline, then the rest'."""
    family_runs = runs[runs["family"] == family]
    variants = list(dict.fromkeys(family_runs["variant"].tolist()))
    baselines = family_runs.loc[family_runs["is_baseline"].astype(bool), "variant"].unique()
    if len(baselines):
        variants.remove(baselines[0])
        variants.insert(0, baselines[0])
    return variants


def _per_run(
    metrics: pd.DataFrame, family: str, metric: str, split: str, stage: str = "final"
) -> pd.DataFrame:
    rows = select_values(_family_metrics(metrics, family), metric, split, stage)
    return rows[["variant", "seed", "epoch", "value"]]


def _summary(
    metrics: pd.DataFrame, family: str, metric: str, split: str, variants: list[str]
) -> pd.DataFrame:
    summary = summarize(_family_metrics(metrics, family), metric, split)
    if summary.empty:
        return summary
    order = {v: i for i, v in enumerate(variants)}
    summary = summary[summary["variant"].isin(order)]
    return summary.sort_values("variant", key=lambda s: s.map(order)).reset_index(drop=True)


def _trainable_params(runs: pd.DataFrame, metrics: pd.DataFrame, family: str) -> pd.Series:
    """Trainable parameters per variant: exact counts from ok runs (identical across seeds)."""
    family_runs = runs[(runs["family"] == family) & (runs["status"] == "ok")]
    if "trainable_params" in family_runs.columns and family_runs["trainable_params"].notna().any():
        return family_runs.groupby("variant", sort=False)["trainable_params"].median().dropna()
    rows = _per_run(metrics, family, "trainable_params", "none")
    return rows.groupby("variant", sort=False)["value"].median()


def _is_accuracy(metric: str) -> bool:
    return metric == "accuracy"


def _scale(metric: str, unit: str) -> tuple[float, str]:
    """Factor and axis label so numbers read naturally (accuracy in %, bytes in GiB)."""
    if metric == "accuracy_gain":
        return 100.0, "points"
    if _is_accuracy(metric):
        return 100.0, "%"
    if unit == "bytes":
        return 1 / 2**30, "GiB"
    return 1.0, unit


def _label(metric: str, split: str, unit: str) -> str:
    _, shown_unit = _scale(metric, unit)
    name = metric.replace("_", " ")
    prefix = f"{split} " if split not in ("none", "") else ""
    return f"{prefix}{name} ({shown_unit})" if shown_unit else f"{prefix}{name}"


def _message_figure(title: str, message: str) -> Figure:
    """A figure that says why there is nothing to plot, so the report still has a picture."""
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------
# Reusable panels


def _means_panel(
    ax: plt.Axes,
    runs: pd.DataFrame,
    metrics: pd.DataFrame,
    family: str,
    metric: str = "accuracy",
    split: str = "test",
) -> bool:
    """Mean with 95 % CI per variant (horizontal), each seed as a dot. False when there is no data."""
    variants = variant_order(runs, family)
    summary = _summary(metrics, family, metric, split, variants)
    if summary.empty:
        return False
    per_run = _per_run(metrics, family, metric, split)
    unit = str(summary["unit"].iloc[0])
    factor, _ = _scale(metric, unit)
    shown = [v for v in variants if v in set(summary["variant"])]
    positions = {v: i for i, v in enumerate(shown)}
    colors = dict(zip(shown, sns.color_palette(PALETTE, len(shown)), strict=True))

    seeds = per_run[per_run["variant"].isin(positions)]
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(seeds))  # fixed: figures are reproducible
    ax.scatter(
        seeds["value"] * factor,
        seeds["variant"].map(positions) + jitter,
        s=14,
        color=[colors[v] for v in seeds["variant"]],
        alpha=0.55,
        zorder=2,
        label="single seed",
    )
    for row in summary.itertuples():
        y = positions[row.variant]
        has_interval = math.isfinite(row.ci_low) and math.isfinite(row.ci_high)
        xerr = (
            [[(row.mean - row.ci_low) * factor], [(row.ci_high - row.mean) * factor]]
            if has_interval
            else None
        )
        ax.errorbar(
            row.mean * factor,
            y,
            xerr=xerr,
            fmt="D",
            color=colors[row.variant],
            markeredgecolor="black",
            capsize=4,
            markersize=7,
            zorder=3,
        )
        ax.annotate(
            f"n={row.n}",
            (row.mean * factor, y),
            textcoords="offset points",
            xytext=(0, 9),
            ha="center",
            fontsize=7,
        )
    ax.set_yticks(range(len(shown)), shown)
    ax.set_ylim(len(shown) - 0.5, -0.5)
    ax.set_xlabel(_label(metric, split, unit) + " — mean, 95% CI")
    ax.set_ylabel("")
    return True


def _bar_panel(ax: plt.Axes, values: pd.Series, variants: list[str], xlabel: str, log: bool) -> None:
    shown = [v for v in variants if v in values.index]
    ax.barh(range(len(shown)), [values[v] for v in shown], color=sns.color_palette(PALETTE, len(shown)))
    ax.set_yticks(range(len(shown)), shown)
    ax.set_ylim(len(shown) - 0.5, -0.5)
    if log:
        ax.set_xscale("log")
    for i, v in enumerate(shown):
        text = f"{values[v]:,.0f}" if log else f"{values[v]:.3g}"
        ax.annotate(text, (values[v], i), textcoords="offset points", xytext=(3, 0), va="center", fontsize=7)
    ax.set_xlabel(xlabel)


# ----------------------------------------------------------------------------------------------------
# Figures


def plot_methods(runs: pd.DataFrame, metrics: pd.DataFrame, family: str = "methods") -> Figure:
    """Test accuracy per method (mean, 95 % CI, single seeds as dots) and trainable parameters (log scale).

    Compares LoRA with training only the last layers and with full finetuning: how much accuracy each buys,
    and at what number of trainable parameters.
    """
    with sns.axes_style(STYLE):
        fig, (left, right) = plt.subplots(
            1, 2, figsize=(11, 0.6 * _n_variants(runs, family) + 2.2), sharey=False
        )
        if not _means_panel(left, runs, metrics, family):
            plt.close(fig)
            return _message_figure(family, "no successful runs to plot")
        params = _trainable_params(runs, metrics, family)
        if len(params):
            _bar_panel(
                right, params, variant_order(runs, family), "trainable parameters (log scale)", log=True
            )
        else:
            right.set_axis_off()
        fig.suptitle(f"{family}: accuracy and trainable parameters")
        fig.tight_layout()
    return fig


def plot_rank_alpha(runs: pd.DataFrame, metrics: pd.DataFrame, family: str = "rank_alpha") -> Figure:
    """Mean test accuracy (%) over LoRA rank r and alpha, one panel per scaling rule when it varies.

    Reads the grid from the ``cfg.method.lora.rank`` / ``alpha`` / ``scaling`` columns of ``runs``; cells
    of settings that were not run (or all failed) are blank.
    """
    if LORA_RANK not in runs.columns or LORA_ALPHA not in runs.columns:
        return plot_generic(runs, metrics, family)
    summary = _summary(metrics, family, "accuracy", "test", variant_order(runs, family))
    if summary.empty:
        return _message_figure(family, "no successful runs to plot")
    family_runs = runs[runs["family"] == family]
    columns = [LORA_RANK, LORA_ALPHA] + ([LORA_SCALING] if LORA_SCALING in runs.columns else [])
    settings = family_runs.drop_duplicates("variant").set_index("variant")[columns]
    grid = summary.join(settings, on="variant").dropna(subset=[LORA_RANK, LORA_ALPHA])
    if grid.empty:
        return plot_generic(runs, metrics, family)
    grid[LORA_RANK] = grid[LORA_RANK].astype(int)
    grid[LORA_ALPHA] = grid[LORA_ALPHA].astype(float)
    scalings = (
        list(dict.fromkeys(grid[LORA_SCALING].fillna("").astype(str)))
        if LORA_SCALING in grid.columns
        else [""]
    )
    low, high = grid["mean"].min() * 100, grid["mean"].max() * 100
    if high - low < 0.1:
        # A single cell (or identical means) would give the colour bar an empty range.
        low, high = low - 0.5, high + 0.5
    with sns.axes_style("white"):
        fig, axes = plt.subplots(1, len(scalings), figsize=(5.2 * len(scalings) + 0.8, 4.2), squeeze=False)
        for ax, scaling in zip(axes[0], scalings, strict=True):
            part = grid if scaling == "" else grid[grid[LORA_SCALING].astype(str) == scaling]
            table = part.pivot_table(index=LORA_RANK, columns=LORA_ALPHA, values="mean", aggfunc="mean") * 100
            table.columns = [f"{a:g}" for a in table.columns]
            sns.heatmap(
                table.sort_index(ascending=False),
                annot=True,
                fmt=".1f",
                cmap="viridis",
                vmin=low,
                vmax=high,
                cbar_kws={"label": "test accuracy (%)"},
                ax=ax,
            )
            ax.set_xlabel("alpha")
            ax.set_ylabel("rank r")
            ax.set_title(f"scaling: {scaling}" if scaling else "")
        fig.suptitle(f"{family}: mean test accuracy (%) over rank and alpha")
        fig.tight_layout()
    return fig


def plot_coverage(runs: pd.DataFrame, metrics: pd.DataFrame, family: str = "coverage") -> Figure:
    """Mean test accuracy (95 % CI) against trainable parameters (log scale), one labelled point per variant.

    Shows whether covering more layers with LoRA buys accuracy, and at what parameter cost.
    """
    variants = variant_order(runs, family)
    summary = _summary(metrics, family, "accuracy", "test", variants)
    params = _trainable_params(runs, metrics, family)
    if summary.empty:
        return _message_figure(family, "no successful runs to plot")
    summary = summary[summary["variant"].isin(params.index)]
    if summary.empty:
        return plot_generic(runs, metrics, family)
    with sns.axes_style(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        colors = sns.color_palette(PALETTE, len(summary))
        for color, row in zip(colors, summary.itertuples(), strict=True):
            x = params[row.variant]
            has_interval = math.isfinite(row.ci_low) and math.isfinite(row.ci_high)
            yerr = (
                [[(row.mean - row.ci_low) * 100], [(row.ci_high - row.mean) * 100]] if has_interval else None
            )
            ax.errorbar(x, row.mean * 100, yerr=yerr, fmt="o", color=color, capsize=4, markersize=7)
            ax.annotate(
                f"{row.variant} (n={row.n})",
                (x, row.mean * 100),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.margins(x=0.25, y=0.2)
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("test accuracy (%) — mean, 95% CI")
        ax.set_title(f"{family}: accuracy vs trainable parameters")
        fig.tight_layout()
    return fig


def plot_epochs(runs: pd.DataFrame, metrics: pd.DataFrame, family: str = "epochs") -> Figure:
    """Validation and test accuracy after each epoch (mean with 95 % band), one line per variant.

    The band is the bootstrap interval over seeds at each epoch; with a single seed only the line is drawn.
    """
    family_metrics = _family_metrics(metrics, family)
    variants = variant_order(runs, family)
    splits = [
        s
        for s in ("validation", "test")
        if not select_values(family_metrics, "accuracy", s, "epoch").empty
    ]
    if not splits:
        return _message_figure(family, "no per-epoch accuracy of successful runs to plot")
    with sns.axes_style(STYLE):
        fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4.2), sharey=True, squeeze=False)
        colors = dict(zip(variants, sns.color_palette(PALETTE, len(variants)), strict=True))
        for ax, split in zip(axes[0], splits, strict=True):
            summary = summarize_epochs(family_metrics, "accuracy", split)
            for variant in variants:
                part = summary[summary["variant"] == variant].sort_values("epoch")
                if part.empty:
                    continue
                epochs = part["epoch"].astype(int).to_numpy()
                ax.plot(epochs, part["mean"] * 100, marker="o", color=colors[variant], label=variant)
                band = part[["ci_low", "ci_high"]].astype(float)
                if band.notna().all(axis=None):
                    ax.fill_between(
                        epochs, band["ci_low"] * 100, band["ci_high"] * 100, color=colors[variant], alpha=0.2
                    )
            ax.set_xlabel("epoch")
            ax.set_title(f"{split} accuracy")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axes[0][0].set_ylabel("accuracy (%) — mean, 95% band")
        axes[0][-1].legend(title="variant", fontsize=8)
        fig.suptitle(f"{family}: accuracy per epoch")
        fig.tight_layout()
    return fig


def plot_optimizer(runs: pd.DataFrame, metrics: pd.DataFrame, family: str = "optimizer") -> Figure:
    """Test accuracy per optimizer / schedule (mean, 95 % CI, seeds as dots) and peak memory when recorded.

    Memory is ``peak_cuda_allocated`` on GPU runs, else the process's ``peak_rss``.
    """
    family_metrics = _family_metrics(metrics, family)
    memory = next(
        (m for m in MEMORY_METRICS if not select_values(family_metrics, m, "none").empty),
        None,
    )
    with sns.axes_style(STYLE):
        panels = 2 if memory else 1
        height = 0.6 * _n_variants(runs, family) + 2.2
        fig, axes = plt.subplots(1, panels, figsize=(5.8 * panels, height), squeeze=False)
        if not _means_panel(axes[0][0], runs, metrics, family):
            plt.close(fig)
            return _message_figure(family, "no successful runs to plot")
        if memory:
            _means_panel(axes[0][1], runs, metrics, family, memory, "none")
        fig.suptitle(f"{family}: accuracy" + (" and peak memory" if memory else ""))
        fig.tight_layout()
    return fig


def _method_of(runs: pd.DataFrame, family: str) -> dict[str, str]:
    """Method per variant (``cfg.method.name``, else ``method``), for colouring by method."""
    family_runs = runs[runs["family"] == family]
    column = next((c for c in (cfg("method.name"), "method") if c in family_runs.columns), None)
    if column is None:
        return {}
    named = family_runs.dropna(subset=[column])
    return {str(v): str(m) for v, m in zip(named["variant"], named[column], strict=True)}


def _error_bar(summary_row: pd.Series, factor: float) -> list[list[float]] | None:
    """Error-bar extents (below, above) of a summary row, scaled by ``factor``; None without an interval."""
    mean, low, high = (float(summary_row[c]) for c in ("mean", "ci_low", "ci_high"))
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    return [[(mean - low) * factor], [(high - mean) * factor]]


# Spread (largest / smallest) of base weight bytes beyond which the bar panel switches to a log scale.
LOG_SPREAD = 20.0


def _link_peft_twins(ax, runs, metrics, family, mem, time, shown, gib, ms) -> None:
    """A dotted line from each variant with our layers to its twin with peft's (``cost.peft_counterparts``),
    labelled with ours / peft of the step time (the cost summary has the intervals)."""
    for ours, peft in cost.peft_counterparts(runs[runs["family"] == family]).items():
        if ours not in shown or peft not in shown:
            continue
        xs = [mem.loc[ours, "mean"] * gib, mem.loc[peft, "mean"] * gib]
        ys = [time.loc[ours, "mean"] * ms, time.loc[peft, "mean"] * ms]
        ax.plot(xs, ys, linestyle=":", color="grey", zorder=2)
        ratio = cost.ours_over_peft(metrics, family, ours, peft, cost.MEMORY_TIME_TIME_METRIC)[0]
        if math.isfinite(ratio):
            ax.annotate(f"ours/peft time {ratio:.2f}x", (sum(xs) / 2, sum(ys) / 2), fontsize=7, color="dimgrey",
                        textcoords="offset points", xytext=(4, -10))


def plot_memory_time(runs: pd.DataFrame, metrics: pd.DataFrame, family: str = "memory_time") -> Figure:
    """Memory (GiB) against median step time (ms) per variant, 95 % CIs both ways, coloured by method; a dotted
    line joins a variant with our layers to its twin with peft's (``method.impl``), labelled ours / peft time.

    Memory is ``peak_cuda_allocated`` on GPU runs, else the exact bytes of weights + gradients + optimizer
    state (``state_bytes``); the second panel shows the bytes of the stored frozen base weights per variant
    (4-bit codes and their scales for QLoRA), on a log scale when they span more than a factor of 20.
    """
    variants = variant_order(runs, family)
    memory = cost.memory_metric(metrics, family)
    time = _summary(metrics, family, cost.MEMORY_TIME_TIME_METRIC, "none", variants)
    if memory is None or time.empty:
        # Without both axes there is no scatter; show what there is rather than nothing.
        metric = cost.MEMORY_TIME_TIME_METRIC if not time.empty else memory
        if metric is None:
            return _message_figure(family, "no memory or time measurements of successful runs to plot")
        return plot_generic(runs, metrics, family, metric, "none")
    mem = _summary(metrics, family, memory, "none", variants).set_index("variant")
    time = time.set_index("variant")
    shown = [v for v in variants if v in mem.index and v in time.index]
    methods = _method_of(runs, family)
    method_names = list(dict.fromkeys(methods.get(v, "?") for v in shown))
    colors = dict(zip(method_names, sns.color_palette(PALETTE, len(method_names)), strict=True))
    base = _summary(metrics, family, "base_weight_bytes", "none", variants)
    gib, ms, mib = 1 / 2**30, 1000.0, 1 / 2**20
    with sns.axes_style(STYLE):
        panels = 2 if not base.empty else 1
        fig, axes = plt.subplots(
            1, panels, figsize=(6.2 + 4.2 * (panels - 1), 4.4), squeeze=False,
            gridspec_kw={"width_ratios": [1.5, 1][:panels]},
        )  # fmt: skip
        ax = axes[0][0]
        for variant in shown:
            m, t = mem.loc[variant], time.loc[variant]
            color = colors[methods.get(variant, "?")]
            ax.errorbar(
                m["mean"] * gib,
                t["mean"] * ms,
                xerr=_error_bar(m, gib),
                yerr=_error_bar(t, ms),
                fmt="o",
                color=color,
                markeredgecolor="black",
                capsize=4,
                markersize=8,
                zorder=3,
            )
            ax.annotate(
                f"{variant} (n={int(t['n'])})",
                (m["mean"] * gib, t["mean"] * ms),
                textcoords="offset points",
                xytext=(7, 6),
                fontsize=8,
            )
        _link_peft_twins(ax, runs, metrics, family, mem, time, shown, gib, ms)
        handles = [
            matplotlib.lines.Line2D([], [], marker="o", linestyle="", color=colors[name], markeredgecolor="black",
                                    label=name)
            for name in method_names
        ]  # fmt: skip
        ax.legend(handles=handles, title="method", fontsize=8, title_fontsize=8, loc="best")
        ax.margins(x=0.25, y=0.2)
        memory_label = "peak CUDA allocated" if memory == "peak_cuda_allocated" else "weights + grads + optimizer"
        ax.set_xlabel(f"memory: {memory_label} (GiB) — mean, 95% CI")
        ax.set_ylabel("median step time (ms) — mean, 95% CI")
        ax.set_title("memory vs time per step")
        if panels == 2:
            values = base.set_index("variant")["mean"] * mib
            positive = values[values > 0]
            log = len(positive) > 1 and positive.max() / positive.min() > LOG_SPREAD
            _bar_panel(
                axes[0][1], values, variants, "base weights (MiB" + (", log scale)" if log else ")"), log=log
            )
            for patch, variant in zip(axes[0][1].patches, [v for v in variants if v in values.index], strict=True):
                patch.set_color(colors.get(methods.get(variant, "?"), patch.get_facecolor()))
            axes[0][1].set_title("stored frozen base weights")
        fig.suptitle(f"{family}: memory and time per step")
        fig.tight_layout()
    return fig


def plot_generic(
    runs: pd.DataFrame, metrics: pd.DataFrame, family: str, metric: str = "accuracy", split: str = "test"
) -> Figure:
    """The family's primary metric per variant (mean, 95 % CI, single seeds as dots)."""
    with sns.axes_style(STYLE):
        fig, ax = plt.subplots(figsize=(7, 0.6 * _n_variants(runs, family) + 2.2))
        if not _means_panel(ax, runs, metrics, family, metric, split):
            plt.close(fig)
            return _message_figure(family, "no successful runs to plot")
        ax.set_title(f"{family}: {split} {metric.replace('_', ' ')} per variant")
        fig.tight_layout()
    return fig


def per_epoch_with_zero_shot(family_metrics: pd.DataFrame, metric: str, split: str) -> pd.DataFrame:
    """Per-epoch summaries with the zero-shot evaluation as epoch 0."""
    per_epoch = summarize_epochs(family_metrics, metric, split)
    zero = summarize(family_metrics, metric, split, stage="zero_shot")
    if not zero.empty:
        zero = zero.assign(epoch=pd.array([0] * len(zero), dtype="Int64"))
    parts = [p for p in (zero, per_epoch) if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else per_epoch


def plot_instruct(runs: pd.DataFrame, metrics: pd.DataFrame, family: str = "instruct") -> Figure:
    """Instruction finetuning of a causal LM: test accuracy gained over the same run's zero-shot model (mean,
    95 % CI, seeds as dots) per variant, and test accuracy after each epoch with epoch 0 the zero-shot model.

    Accuracy compares the log-likelihoods of the closed answers (no sampling); without a closed answer set the
    panels show the test response loss instead.
    """
    family_metrics = _family_metrics(metrics, family)
    has_gain = not select_values(family_metrics, "accuracy_gain", "test").empty
    metric = "accuracy" if not select_values(family_metrics, "accuracy", "test").empty else "loss"
    left_metric = "accuracy_gain" if has_gain else metric
    variants = variant_order(runs, family)
    with sns.axes_style(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.55 * _n_variants(runs, family) + 3.2))
        if not _means_panel(left, runs, metrics, family, left_metric, "test"):
            plt.close(fig)
            return _message_figure(family, "no successful runs to plot")
        if has_gain:
            left.axvline(0, color="grey", lw=1, ls="--")
            left.set_title("gain over zero-shot (points)")
        else:
            left.set_title(f"test {metric}")
        summary = per_epoch_with_zero_shot(family_metrics, metric, "test")
        factor = 100 if metric == "accuracy" else 1
        colors = dict(zip(variants, sns.color_palette(PALETTE, len(variants)), strict=True))
        # A variant tested once (at the epoch validation selects) has no curve: its seeds' single values would
        # scatter over epochs and read as one. Its result is in the left panel.
        curves = set(epoch_curve_variants(runs, family))
        if not curves:
            right.text(0.5, 0.5, "no variant was tested after every epoch", ha="center", va="center",
                       transform=right.transAxes)
        for variant in (v for v in variants if v in curves):
            part = summary[summary["variant"] == variant].sort_values("epoch") if len(summary) else summary
            if part.empty:
                continue
            epochs = part["epoch"].astype(int).to_numpy()
            right.plot(epochs, part["mean"] * factor, marker="o", color=colors[variant], label=variant)
            band = part[["ci_low", "ci_high"]].astype(float)
            if len(part) > 1 and band.notna().all(axis=None):
                right.fill_between(epochs, band["ci_low"] * factor, band["ci_high"] * factor,
                                   color=colors[variant], alpha=0.15)
        right.set_xlabel("epoch (0 = zero-shot, before training)")
        right.set_ylabel(f"test {metric}{' (%)' if metric == 'accuracy' else ' (nats per response token)'}")
        right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        right.set_title(f"test {metric} per epoch — mean, 95% band")
        if curves:
            right.legend(title="variant", fontsize=7)
        fig.suptitle(f"{family}: instruction finetuning")
        fig.tight_layout()
    return fig


def _n_variants(runs: pd.DataFrame, family: str) -> int:
    return max(1, runs.loc[runs["family"] == family, "variant"].nunique())


# ----------------------------------------------------------------------------------------------------
# How much to trust a single run (lora_bench.analysis.variance)


def _short(setting: str, width: int = 28) -> str:
    return setting if len(setting) <= width else setting[: width - 1] + "…"


def plot_variance(runs: pd.DataFrame, metrics: pd.DataFrame, family: str = "variance") -> Figure:
    """Test accuracy of every run by data seed (which examples are in train, validation and test) and train
    seed (initialisation, data order, dropout), one panel per setting: the spread between the columns is the
    data split's share of the variance, the spread within a column the training seed's.

    Short lines are the mean of each data seed; the variance-components table gives the shares with intervals.
    """
    runs, metrics = variance.with_seed_columns(runs), variance.with_seed_columns(metrics)
    rows = select_values(metrics[metrics["family"] == family], "accuracy", "test", "final")
    settings = [s for s in dict.fromkeys(runs.loc[runs["family"] == family, "setting"]) if s in set(rows["setting"])]
    if not settings:
        return _message_figure(family, "no successful runs with test accuracy to plot")
    train_seeds = sorted(rows["train_seed"].unique())
    colors = dict(zip(train_seeds, sns.color_palette(PALETTE, len(train_seeds)), strict=True))
    with sns.axes_style(STYLE):
        fig, axes = plt.subplots(1, len(settings), figsize=(3.4 * len(settings) + 1.2, 3.6), sharey=True,
                                 squeeze=False)
        for ax, setting in zip(axes[0], settings, strict=True):
            part = rows[rows["setting"] == setting]
            data_seeds = sorted(part["data_seed"].unique())
            where = {d: i for i, d in enumerate(data_seeds)}
            for (d, t), group in part.groupby(["data_seed", "train_seed"]):
                offset = (train_seeds.index(t) - (len(train_seeds) - 1) / 2) * 0.08
                ax.scatter(where[d] + offset, group["value"].mean() * 100, color=colors[t], s=22, zorder=3,
                           label=f"train seed {t}")
            for d, group in part.groupby("data_seed"):
                ax.hlines(group["value"].mean() * 100, where[d] - 0.3, where[d] + 0.3, color="black", lw=1.2)
            ax.set_xticks(range(len(data_seeds)), [str(d) for d in data_seeds])
            ax.set_xlim(-0.6, len(data_seeds) - 0.4)
            ax.set_xlabel("data seed (split)")
            ax.set_title(_short(setting), fontsize=9)
        axes[0][0].set_ylabel("test accuracy (%)")
        handles, labels = axes[0][-1].get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        axes[0][-1].legend(unique.values(), unique.keys(), fontsize=7, loc="best")
        fig.suptitle(f"{family}: data split vs training seed", fontsize=10)
        fig.tight_layout()
    return fig


def plot_sweep(runs: pd.DataFrame, metrics: pd.DataFrame, family: str = "sweep") -> Figure:
    """A sweep checks its own winner: every configuration's single-run validation accuracy (left, best first;
    the top k re-run), and for the re-run ones the sweep score against the mean of the re-runs on fresh train
    and data seeds (95 % t CI), on validation (the selection metric) and test, with the identity line.

    Points below the line were luckier in the sweep than on average: the winner's distance below it is the
    optimism of picking the best of many single runs. Small grey dots are the single re-runs.
    """
    runs, metrics = variance.with_seed_columns(runs), variance.with_seed_columns(metrics)
    family_runs = runs[runs["family"] == family]
    reeval, _ = variance.sweep_tables(family_runs, metrics[metrics["family"] == family], resamples=999)
    if reeval.empty:
        return _message_figure(family, "no finished sweep runs to plot")
    with sns.axes_style(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), gridspec_kw={"width_ratios": [1.2, 1, 1]})
        ranking = reeval[reeval["split"] == "validation"].sort_values("sweep_rank")
        colors = np.where(ranking["is_winner"], "C3", np.where(ranking["in_top_k"], "C0", "0.6"))
        axes[0].scatter(ranking["sweep_rank"], ranking["sweep_score"] * 100, c=list(colors), s=18, zorder=3)
        axes[0].set_xlabel("sweep rank (validation accuracy, one run each)")
        axes[0].set_ylabel("validation accuracy (%)")
        axes[0].set_title(f"{len(ranking)} configurations; red = winner, blue = re-run", fontsize=9)
        rerun_ids = set(family_runs.loc[family_runs["sweep_stage"] == "rerun", "run_id"])
        for ax, split in zip(axes[1:], variance.SWEEP_SPLITS, strict=True):
            part = reeval[(reeval["split"] == split) & reeval["in_top_k"]]
            if part.empty:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "no finished re-runs", ha="center", va="center", transform=ax.transAxes)
                continue
            # Single re-runs as small dots at their configuration's sweep score.
            singles = select_values(metrics[metrics["run_id"].isin(rerun_ids)], "accuracy", split, "final")
            x = singles["setting"].map(part.set_index("setting")["sweep_score"])
            ax.scatter(x * 100, singles["value"] * 100, s=10, color="0.35", alpha=0.6, zorder=2,
                       label="single re-run")
            for row in part.itertuples():
                has_ci = math.isfinite(row.rerun_ci_low) and math.isfinite(row.rerun_ci_high)
                yerr = [[(row.rerun_mean - row.rerun_ci_low) * 100], [(row.rerun_ci_high - row.rerun_mean) * 100]]
                ax.errorbar(row.sweep_score * 100, row.rerun_mean * 100, yerr=yerr if has_ci else None, fmt="o",
                            color="C3" if row.is_winner else "C0", capsize=3, markersize=6, zorder=3)
                ax.annotate(f"#{row.sweep_rank} {_short(row.setting, 22)}", (row.sweep_score * 100,
                            row.rerun_mean * 100), textcoords="offset points", xytext=(4, 4), fontsize=6)
            values = np.concatenate([part["sweep_score"], part["rerun_ci_low"].dropna(),
                                     part["rerun_ci_high"].dropna(), part["rerun_mean"]]) * 100
            low, high = float(np.nanmin(values)), float(np.nanmax(values))
            pad = max(0.5, 0.08 * (high - low))
            ax.plot([low - pad, high + pad], [low - pad, high + pad], ls="--", color="0.4", lw=1, label="identity")
            ax.set_xlim(low - pad, high + pad)
            ax.set_ylim(low - pad, high + pad)
            ax.set_aspect("equal", adjustable="box")
            ax.set_xlabel(f"sweep {split} accuracy (%), single run")
            ax.set_ylabel(f"re-run mean {split} accuracy (%), 95% CI")
            ax.set_title(f"{split}: sweep score vs re-runs", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{family}: does the sweep's winner hold up?", fontsize=10)
        fig.tight_layout()
    return fig


def plot_tune(runs: pd.DataFrame, metrics: pd.DataFrame, family: str) -> Figure:
    """Tuning with an equal budget: each variant's validation score (mean over the tuning seeds; single runs as
    small dots) against the tuned value, log scale; the ringed point is the value chosen for the comparison.

    Only the validation split was evaluated: the test split played no part in choosing.
    """
    table = tuning.tuning_table(runs, metrics)
    table = table[table["tuning_family"] == family]
    if table.empty or table["mean"].isna().all():
        return _message_figure(family, "no finished tuning runs to plot")
    name, split = tuning.TUNE_METRICS[str(table["metric"].iloc[0])]
    singles = select_values(metrics[metrics["family"] == family], name, split, "final").merge(
        runs[["run_id", "tune_value"]], on="run_id")
    settings = list(dict.fromkeys(table["setting"]))
    colors = dict(zip(settings, sns.color_palette(PALETTE, len(settings)), strict=True))
    with sns.axes_style(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for setting in settings:
            part = table[table["setting"] == setting].sort_values("value")
            ax.plot(part["value"], part["mean"] * 100, marker="o", color=colors[setting], label=setting)
            chosen = part[part["chosen"]]
            ax.scatter(chosen["value"], chosen["mean"] * 100, s=160, facecolors="none", edgecolors=colors[setting],
                       linewidths=1.6, zorder=4)
            dots = singles[singles["setting"] == setting]
            ax.scatter(dots["tune_value"], dots["value"] * 100, s=8, color=colors[setting], alpha=0.5, zorder=2)
        if (table["value"] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(str(table["key"].iloc[0]))
        ax.set_ylabel(f"{split} {name} (%)")
        ax.legend(fontsize=7, loc="best")
        ax.set_title(f"{family}: ringed = chosen for {table['family'].iloc[0]}", fontsize=10)
        fig.tight_layout()
    return fig


ITEM_RANKS_FIGURE = "item_ranks"


def plot_item_ranks(ranks: pd.DataFrame) -> Figure:
    """Probability of each rank per variant (1 = best test accuracy), one panel per family.

    From the ``item_ranks`` table (``lora_bench.analysis.items``): a two-way bootstrap over the seeds and test examples
    every variant shares; the letters after a name are its tie groups (variants sharing a letter have no
    significant pairwise difference by the crossed items x seeds test, Holm-corrected within the family).
    """
    if ranks.empty:
        return _message_figure("Rank uncertainty", "No run kept its predictions: no item-level ranks.")
    families = list(dict.fromkeys(ranks["family"]))
    with sns.axes_style(STYLE):
        fig, axes = plt.subplots(len(families), 1, figsize=(7.5, 1.2 + 0.45 * ranks.groupby("family")["variant"]
                                                               .nunique().sum() + 0.6 * len(families)),
                                 squeeze=False)
        for ax, family in zip(axes[:, 0], families):
            table = ranks[ranks["family"] == family]
            wide = table.pivot_table(index="variant", columns="rank", values="probability", sort=False)
            order = table.drop_duplicates("variant").sort_values("mean_rank")
            wide = wide.reindex(index=order["variant"])
            colours = sns.color_palette("viridis", wide.shape[1])
            left = np.zeros(len(wide))
            for position, rank in enumerate(wide.columns):
                ax.barh(range(len(wide)), wide[rank], left=left, color=colours[position], label=f"rank {rank}")
                left += wide[rank].to_numpy()
            ax.set_yticks(range(len(wide)), [f"{v} ({g})" for v, g in zip(order["variant"], order["tie_group"])],
                          fontsize=8)
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            first = order.iloc[0]
            ax.set_title(f"{family}: {int(first['n_seeds'])} seeds x {int(first['n_items'])} items", fontsize=10)
            ax.legend(fontsize=7, ncol=min(6, wide.shape[1]), loc="lower right", frameon=True)
        axes[-1, 0].set_xlabel("probability of rank")
        fig.tight_layout()
    return fig


# Family kind -> its figure: the kind-keyed registry of figures (every kind of lora_bench.study.KINDS has an entry;
# a kind unknown to the registry, from an old table, gets plot_generic).
FIGURES: dict[str, Callable[[pd.DataFrame, pd.DataFrame, str], Figure]] = {
    "methods": plot_methods,
    "rank_alpha": plot_rank_alpha,
    "coverage": plot_coverage,
    "epochs": plot_epochs,
    "optimizer": plot_optimizer,
    "memory_time": plot_memory_time,
    "variance": plot_variance,
    "sweep": plot_sweep,
    "instruct": plot_instruct,
    "lora_variants": plot_generic,  # its costs are tables in the report; accuracy reads as a generic family's
    "tune": plot_tune,
    "generic": plot_generic,
}


def figure_function(kind: str) -> Callable[[pd.DataFrame, pd.DataFrame, str], Figure]:
    """The figure function registered for a family kind (``plot_generic`` for unknown kinds)."""
    return FIGURES.get(kind, plot_generic)


def figure_caption(kind: str) -> str:
    """Plain-text caption of a kind's figure: the first paragraph of its function's docstring."""
    doc = figure_function(kind).__doc__ or ""
    first_paragraph = doc.strip().split("\n\n")[0]
    return " ".join(first_paragraph.split())


# ----------------------------------------------------------------------------------------------------
# Files


def save_figure(fig: Figure, out_base: str | Path) -> tuple[Path, Path]:
    """Write ``<out_base>.png`` (150 dpi) and ``<out_base>.svg``; returns both paths.

    Dates and random ids are left out of the files so rebuilding identical tables gives identical figures.
    """
    out_base = Path(out_base)
    out_base.parent.mkdir(parents=True, exist_ok=True)
    png, svg = out_base.with_name(out_base.name + ".png"), out_base.with_name(out_base.name + ".svg")
    replace_atomically(png, lambda tmp: fig.savefig(tmp, format="png", dpi=PNG_DPI, bbox_inches="tight",
                                                    metadata={"Software": None}))
    with matplotlib.rc_context({"svg.hashsalt": "lora-bench"}):
        replace_atomically(svg, lambda tmp: fig.savefig(tmp, format="svg", bbox_inches="tight",
                                                        metadata={"Date": None}))
    return png, svg


def save_and_close(fig: Figure, out_base: str | Path) -> tuple[Path, Path]:
    """``save_figure``, then close ``fig``: pyplot keeps every open figure alive until it is closed."""
    try:
        return save_figure(fig, out_base)
    finally:
        plt.close(fig)


def make_all_figures(runs: pd.DataFrame, metrics: pd.DataFrame, out_dir: str | Path) -> list[dict]:
    """One figure per family (``<out_dir>/<family>.png`` and ``.svg``), in order of first appearance.

    Returns one dict per family: ``family``, ``kind``, ``png``, ``svg``, ``caption``.
    """
    out_dir = Path(out_dir)
    made = []
    for family in family_order(runs):
        kind = str(runs.loc[runs["family"] == family, "family_kind"].iloc[0])
        fig = figure_function(kind)(runs, metrics, family)
        try:
            png, svg = save_figure(fig, out_dir / figure_stem(family))
        finally:
            plt.close(fig)
        made.append({"family": family, "kind": kind, "png": png, "svg": svg, "caption": figure_caption(kind)})
    return made


def figure_stem(family: str) -> str:
    """File name (without suffix) of a family's figure; config keys are kept portable as file names."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in family)
