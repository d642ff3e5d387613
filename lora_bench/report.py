"""The study's report: ``paper/report.md`` and a self-contained ``paper/report.html``, from tables alone.

``build_report`` reads the tidy tables (``runs``, ``metrics``) and what ``lora_bench.stats`` derived from
them (``tests``, ``summary``, ``seed_consistency``) plus the figure files, and fills the Jinja2 template
``templates/report.md.j2``. It never recomputes statistics: a report that disagreed with the committed
tables would be worse than none, so a missing table is an error that names the command to run.

Every sentence that states a result is generated from a row of the tests table, with its interval,
test, Holm-adjusted p-value and number of seeds, and "no significant difference" is said as plainly
as a win. The reference section puts each published number (``lora_bench.reference``) beside ours and
says whether it lies inside our 95 % interval and whether the setting is the same at all.

The HTML is the Markdown converted with the ``markdown`` package and wrapped in
``templates/report.html.j2``; figures are embedded as base64 PNG data URIs so the file can be mailed.
"""

from __future__ import annotations

import base64
import math
import os
import re
import urllib.parse
from pathlib import Path

import jinja2
import markdown
import pandas as pd

from lora_bench import plots, reference, stats

TEMPLATES = Path(__file__).parent / "templates"
PRIMARY_METRIC, PRIMARY_SPLIT = "accuracy", "test"
COST_METRICS = ("wall_time", "median_step_time", "examples_per_second", "peak_rss", "peak_cuda_allocated")
# Kinds whose cost comparisons (time, memory) are worth a table; in a rank/alpha grid they are noise.
COST_KINDS = ("methods", "coverage", "optimizer", "memory_time", "generic")
ERROR_CHARS = 400
DEFAULT_TITLE = "lora-bench: LoRA finetuning with seeds and error bars"
REQUIRED_TABLES = ("runs", "metrics", "tests", "summary", "seed_consistency")


# ----------------------------------------------------------------------------------------------------
# Number formatting


def _finite(x) -> bool:
    try:
        return x is not None and not pd.isna(x) and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def fmt_percent(fraction, decimals: int = 2) -> str:
    """An accuracy fraction as percent: 0.89437 -> '89.44'."""
    return f"{float(fraction) * 100:.{decimals}f}" if _finite(fraction) else "–"


def fmt_points(fraction_difference, decimals: int = 2) -> str:
    """A difference of accuracy fractions in percentage points, signed: 0.0123 -> '+1.23'."""
    if not _finite(fraction_difference):
        return "–"
    text = f"{float(fraction_difference) * 100:+.{decimals}f}"
    return "±0." + "0" * decimals if text.lstrip("+-") == "0." + "0" * decimals else text.replace("-", "−")


def fmt_p(p) -> str:
    """p-values with three significant digits, or '< 0.001'."""
    if not _finite(p):
        return "–"
    p = float(p)
    return "< 0.001" if p < 0.001 else f"{p:.3g}"


def p_phrase(p) -> str:
    """'p = 0.0246' or 'p < 0.001' for running text."""
    text = fmt_p(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def fmt_signed(x, digits: int = 2) -> str:
    """A signed number with a true minus sign: -1.614 -> '−1.61'."""
    return f"{float(x):+.{digits}f}".replace("-", "−") if _finite(x) else "–"


def fmt_count(n) -> str:
    return f"{int(round(float(n))):,}" if _finite(n) else "–"


def fmt_value(value, unit: str, decimals: int = 3) -> str:
    """A metric value in a readable unit (bytes as GiB, fractions as %)."""
    if not _finite(value):
        return "–"
    value = float(value)
    if unit == "fraction":
        return f"{value * 100:.2f}\u00a0%"
    if unit == "bytes":
        return f"{value / 2**30:.{decimals}g} GiB"
    if unit == "count":
        return fmt_count(value)
    if unit == "relative":
        return f"{value * 100:+.1f} %".replace("-", "−")
    return f"{value:.{decimals}g} {unit}".strip()


def fmt_interval(low, high, formatter) -> str:
    if not (_finite(low) and _finite(high)):
        return "–"
    # A no-break space keeps an interval on one line in narrow table cells.
    return f"[{formatter(low)},\u00a0{formatter(high)}]"


def md_text(text) -> str:
    """Text from the tables made safe inside Markdown (tables, emphasis) and the HTML made from it."""
    text = " ".join(str(text if text is not None else "").split())
    # '<' and '>' would open raw HTML; a bare '&' is left alone (Markdown renders it as is).
    text = text.replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)


# ----------------------------------------------------------------------------------------------------
# Reading


def _read_tables(tables_dir: Path) -> dict[str, pd.DataFrame]:
    tables = {}
    for name in REQUIRED_TABLES:
        path = tables_dir / f"{name}.parquet"
        if not path.exists():
            hint = (
                "python -m lora_bench collect"
                if name in ("runs", "metrics")
                else "python -m lora_bench stats"
            )
            raise FileNotFoundError(f"{path} is missing; the report reads only tables: run `{hint}` first")
        tables[name] = pd.read_parquet(path)
    return tables


def _unique_text(runs: pd.DataFrame, column: str) -> list[str]:
    if column not in runs.columns:
        return []
    values = runs[column].dropna().astype(str)
    return [v for v in dict.fromkeys(values) if v]


def _seed_text(seeds: list[int]) -> str:
    if not seeds:
        return "none"
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


# ----------------------------------------------------------------------------------------------------
# Sections


def _overview(runs: pd.DataFrame, meta: dict) -> dict:
    ok = runs["status"] == "ok"
    seeds = sorted({int(s) for s in runs["seed"].dropna()})
    per_condition = runs.groupby(["family", "variant"])["seed"].nunique()
    families = stats.family_order(runs)
    return {
        "n_runs": len(runs),
        "n_ok": int(ok.sum()),
        "n_failed": int((~ok).sum()),
        "families": [
            {"name": f, "kind": str(runs.loc[runs["family"] == f, "family_kind"].iloc[0])} for f in families
        ],
        "n_conditions": len(per_condition),
        "seeds": _seed_text(seeds),
        "seeds_per_condition": (
            f"{per_condition.min()}"
            if per_condition.min() == per_condition.max()
            else f"{per_condition.min()}–{per_condition.max()}"
        ),
        "models": ", ".join(md_text(m) for m in _unique_text(runs, "cfg.model.name")) or "unknown model",
        "data": md_text(_data_description(runs)),
        "devices": ", ".join(md_text(d) for d in _unique_text(runs, "device")) or "unknown device",
    }


# Recipe settings worth a line in the setup table when the runs table has them (values differ per
# variant where a family varies them, e.g. the learning rate per method).
RECIPE_COLUMNS = (
    ("Max tokens per example", "cfg.data.max_length"),
    ("Epochs", "cfg.train.epochs"),
    ("Batch size", "cfg.train.batch_size"),
    ("Learning rates", "cfg.train.lr"),
    ("Optimizer", "cfg.train.optimizer"),
    ("Schedule", "cfg.train.schedule"),
    ("Precision", "cfg.train.precision"),
)


def _data_description(runs: pd.DataFrame) -> str:
    """Data set names with their source, e.g. 'sentences (pang_lee)'."""
    names = _unique_text(runs, "cfg.data.name")
    sources = _unique_text(runs, "cfg.data.source")
    if not names:
        return ", ".join(sources) or "unknown data"
    text = ", ".join(names)
    extra = [s for s in sources if s not in names]
    return f"{text} ({', '.join(extra)})" if extra else text


def _setup_rows(runs: pd.DataFrame, meta: dict) -> list[tuple[str, str]]:
    def joined(column: str) -> str:
        values = _unique_text(runs, column)
        return ", ".join(md_text(v) for v in values) if values else "not recorded"

    rows = [
        ("Model", joined("cfg.model.name")),
        ("Model source", joined("cfg.model.source")),
        ("Data", md_text(_data_description(runs))),
        ("Hardware / device", joined("device")),
        ("Git commit", joined("git_sha")),
    ]
    caps = [f"cfg.data.max_examples.{split}" for split in ("train", "validation", "test")]
    if all(c in runs.columns for c in caps):
        rows.append(("Examples used (train / validation / test)", " / ".join(joined(c) for c in caps)))
    for label, column in RECIPE_COLUMNS:
        if column in runs.columns:
            rows.append((label, joined(column)))
    version_columns = sorted(c for c in runs.columns if c.startswith("versions."))
    preferred = [f"versions.{p}" for p in ("torch", "transformers", "peft")]
    for column in [c for c in preferred if c in version_columns] + [
        c for c in version_columns if c not in preferred
    ]:
        rows.append((f"{column.split('.', 1)[1]} version", joined(column)))
    for column in preferred:
        if column not in version_columns:
            rows.append((f"{column.split('.', 1)[1]} version", "not recorded"))
    seeds = sorted({int(s) for s in runs["seed"].dropna()})
    rows.append(("Seeds", _seed_text(seeds)))
    for key, value in (meta or {}).items():
        if key not in ("title",):
            rows.append((md_text(key), md_text(value)))
    return rows


def _claim(test: pd.Series) -> str:
    """One sentence for one comparison of the primary metric, with its evidence."""
    variant, baseline = f"**{md_text(test['variant'])}**", f"**{md_text(test['baseline'])}**"
    if not _finite(test["p_value"]):
        reason = md_text(test["note"]) or "no p-value"
        return f"{variant} vs {baseline} was not tested: {reason}."
    accuracy = test["metric"] == "accuracy"
    unit_word = " points" if accuracy else f" {test['unit']}"

    def number(x) -> str:
        return fmt_points(x) if accuracy else fmt_signed(x, 3)

    if test["paired"]:
        n = f"n = {int(test['n_pairs'])} seed pairs"
    else:
        n = f"n = {int(test['n_variant'])} vs {int(test['n_baseline'])} runs"
    evidence = [
        f"95% CI {number(test['diff_ci_low'])} to {number(test['diff_ci_high'])}",
        f"{test['test']}, Holm {p_phrase(test['p_holm'])}",
    ]
    if _finite(test["effect_size"]):
        evidence.append(f"{test['effect_size_kind']} = {fmt_signed(test['effect_size'])}")
    evidence.append(n)
    evidence_text = "; ".join(evidence)
    if test["verdict"] == "better":
        sentence = f"{variant} beats {baseline}: {number(test['diff'])}{unit_word} ({evidence_text})."
    elif test["verdict"] == "worse":
        sentence = f"{variant} is worse than {baseline}: {number(test['diff'])}{unit_word} ({evidence_text})."
    else:
        sentence = (
            f"No significant difference between {variant} and {baseline}: "
            f"{number(test['diff'])}{unit_word} ({evidence_text})."
        )
    rank_p = test["p_nonparametric_holm"]
    if test["verdict"] != "n.s." and _finite(rank_p) and not _rank_test_powerless(test):
        agrees = float(rank_p) < stats.ALPHA
        sentence += f" The rank test ({test['nonparametric_test']}, Holm {p_phrase(rank_p)}) " + (
            "agrees." if agrees else "does not confirm it."
        )
    if test["note"]:
        sentence += f" Note: {md_text(test['note'])}."
    return sentence


def _rank_test_powerless(test: pd.Series) -> bool:
    """Whether the exact Wilcoxon test could not reach p < alpha with this many pairs, whatever the data."""
    return bool(test["paired"]) and 2.0 ** (1 - int(test["n_pairs"])) >= stats.ALPHA


def _rank_note(family_tests: pd.DataFrame) -> str:
    powerless = (
        family_tests[family_tests.apply(_rank_test_powerless, axis=1)] if len(family_tests) else family_tests
    )
    if powerless.empty:
        return ""
    pairs = sorted({int(n) for n in powerless["n_pairs"]})
    smallest = 2.0 ** (1 - max(pairs))
    return (
        f"With {' or '.join(str(n) for n in pairs)} seed pairs the exact Wilcoxon signed-rank test cannot "
        f"give p below {fmt_p(smallest)}, so it cannot confirm these differences whatever the data; the "
        "paired t test carries the verdict."
    )


def _condition_rows(
    family: str, runs: pd.DataFrame, summary: pd.DataFrame, tests: pd.DataFrame
) -> list[dict]:
    """The per-variant table of a (non-epochs) family: accuracy, CI, parameters, difference, verdict."""
    family_runs = runs[runs["family"] == family]
    primary = summary[
        (summary["family"] == family)
        & (summary["metric"] == PRIMARY_METRIC)
        & (summary["split"] == PRIMARY_SPLIT)
        & (summary["stage"] == "final")
    ].set_index("variant")
    params = summary[(summary["family"] == family) & (summary["metric"] == "trainable_params")].set_index(
        "variant"
    )
    family_tests = tests[(tests["family"] == family) & (tests["metric"] == PRIMARY_METRIC)]
    family_tests = family_tests[family_tests["split"] == PRIMARY_SPLIT].set_index("variant")
    rows = []
    for variant in plots.variant_order(runs, family):
        n_failed = int(((family_runs["variant"] == variant) & (family_runs["status"] != "ok")).sum())
        row = {"variant": md_text(variant), "n": "0", "mean": "–", "ci": "–", "params": "–"}
        if variant in primary.index:
            s = primary.loc[variant]
            row.update(
                n=str(int(s["n"])),
                mean=fmt_percent(s["mean"]),
                ci=fmt_interval(s["ci_low"], s["ci_high"], fmt_percent),
            )
        if n_failed:
            row["n"] += f" ({n_failed} failed)"
        if variant in params.index:
            row["params"] = fmt_count(params.loc[variant, "mean"])
        else:
            counts = family_runs.loc[family_runs["variant"] == variant, "trainable_params"].dropna()
            row["params"] = (
                fmt_count(counts.iloc[0]) if "trainable_params" in family_runs and len(counts) else "–"
            )
        is_baseline = bool(
            family_runs.loc[family_runs["variant"] == variant, "is_baseline"].astype(bool).any()
        )
        if is_baseline:
            row.update(diff="baseline", p="", verdict="")
        elif variant in family_tests.index:
            t = family_tests.loc[variant]
            diff = fmt_points(t["diff"])
            interval = fmt_interval(t["diff_ci_low"], t["diff_ci_high"], fmt_points)
            row.update(
                diff=f"{diff} {interval}" if interval != "–" else diff,
                p=fmt_p(t["p_holm"]),
                verdict=str(t["verdict"]) if _finite(t["p_value"]) else "not tested",
            )
        else:
            row.update(diff="–", p="–", verdict="not tested")
        rows.append(row)
    return rows


def _epoch_rows(family: str, runs: pd.DataFrame, summary: pd.DataFrame, tests: pd.DataFrame) -> list[dict]:
    per_epoch = summary[
        (summary["family"] == family) & (summary["stage"] == "epoch") & (summary["metric"] == "accuracy")
    ]
    epoch_tests = tests[
        (tests["family"] == family) & (tests["metric"] == "accuracy") & (tests["split"] == PRIMARY_SPLIT)
    ].set_index("variant")
    rows = []
    for variant in plots.variant_order(runs, family):
        part = per_epoch[per_epoch["variant"] == variant]
        for epoch in sorted({int(e) for e in part["epoch"].dropna()}):
            cells = {"variant": md_text(variant), "epoch": str(epoch)}
            for split in ("validation", "test"):
                match = part[(part["split"] == split) & (part["epoch"] == epoch)]
                if len(match):
                    s = match.iloc[0]
                    cells["n"] = str(int(s["n"]))
                    cells[split] = (
                        f"{fmt_percent(s['mean'])} {fmt_interval(s['ci_low'], s['ci_high'], fmt_percent)}"
                    )
                else:
                    cells[split] = "–"
            cells.setdefault("n", "0")
            key = f"{variant}@epoch{epoch}"
            if epoch == 1:
                cells.update(diff="reference", p="", verdict="")
            elif key in epoch_tests.index:
                t = epoch_tests.loc[key]
                cells.update(
                    diff=f"{fmt_points(t['diff'])} {_points_interval(t)}",
                    p=fmt_p(t["p_holm"]),
                    verdict=str(t["verdict"]) if _finite(t["p_value"]) else "not tested",
                )
            else:
                cells.update(diff="–", p="–", verdict="not tested")
            rows.append(cells)
    return rows


def _points_interval(test) -> str:
    return fmt_interval(test["diff_ci_low"], test["diff_ci_high"], fmt_points)


def _relative(x) -> str:
    return fmt_value(x, "relative")


def _cost_rows(family: str, tests: pd.DataFrame) -> list[dict]:
    rows = []
    costs = tests[(tests["family"] == family) & tests["metric"].isin(COST_METRICS)]
    costs = costs[costs["mean_variant"].notna() & costs["mean_baseline"].notna()]
    for t in costs.itertuples():
        relative = t.diff / t.mean_baseline if _finite(t.mean_baseline) and t.mean_baseline else math.nan
        low = t.diff_ci_low / t.mean_baseline if _finite(relative) else math.nan
        high = t.diff_ci_high / t.mean_baseline if _finite(relative) else math.nan
        rows.append(
            {
                "variant": md_text(t.variant),
                "metric": md_text(t.metric.replace("_", " ")),
                "mean": fmt_value(t.mean_variant, t.unit),
                "baseline": fmt_value(t.mean_baseline, t.unit),
                "change": f"{_relative(relative)} {fmt_interval(low, high, _relative)}",
                "p": fmt_p(t.p_holm),
                "verdict": t.verdict if _finite(t.p_value) else "not tested",
            }
        )
    return rows


def _family_sections(tables: dict, figures_dir: Path, out_dir: Path) -> list[dict]:
    runs, summary, tests = tables["runs"], tables["summary"], tables["tests"]
    sections = []
    for family in stats.family_order(runs):
        kind = str(runs.loc[runs["family"] == family, "family_kind"].iloc[0])
        png = figures_dir / f"{plots.figure_stem(family)}.png"
        primary_tests = tests[
            (tests["family"] == family)
            & (tests["metric"] == PRIMARY_METRIC)
            & (tests["split"] == PRIMARY_SPLIT)
        ]
        sections.append(
            {
                "name": md_text(family),
                "anchor": family,
                "kind": kind,
                "caption": md_text(plots.figure_caption(kind)),
                "figure": _relative_url(png, out_dir) if png.exists() else None,
                "figure_path": png,
                "rows": _condition_rows(family, runs, summary, tests) if kind != "epochs" else [],
                "final_rows": _condition_rows(family, runs, summary, tests.iloc[0:0])
                if kind == "epochs"
                else [],
                "epoch_rows": _epoch_rows(family, runs, summary, tests) if kind == "epochs" else [],
                "claims": [{"text": _claim(t), "verdict": t["verdict"]} for _, t in primary_tests.iterrows()],
                "rank_note": _rank_note(primary_tests[primary_tests["p_value"].notna()]),
                "cost_rows": _cost_rows(family, tests) if kind in COST_KINDS else [],
                "baseline": md_text(stats.baseline_variant(runs, family)[0] or "none"),
            }
        )
    return sections


def _seed_rows(seed_consistency: pd.DataFrame) -> list[dict]:
    rows = []
    for s in seed_consistency.itertuples():
        if s.n < 2:
            std = spread = "–"
        elif s.metric == "accuracy":
            std, spread = f"{s.std * 100:.2f}", f"{s.range * 100:.2f}"
        else:
            std, spread = fmt_value(s.std, s.unit), fmt_value(s.range, s.unit)
        rows.append(
            {
                "family": md_text(s.family),
                "variant": md_text(s.variant),
                "n": str(int(s.n)),
                "std": std,
                "range": spread,
                "seeds": fmt_count(s.seeds_for_1pt),
                "seeds_paired": fmt_count(s.seeds_for_1pt_paired),
            }
        )
    return rows


def _failed_runs(runs: pd.DataFrame) -> list[dict]:
    failed = runs[runs["status"] != "ok"]
    out = []
    for row in failed.itertuples():
        error = str(getattr(row, "error", "") or "no error message recorded")
        if len(error) > ERROR_CHARS:
            error = error[:ERROR_CHARS] + " …"
        out.append({"run_id": str(row.run_id).replace("`", "'"), "error": md_text(error)})
    return out


# ----------------------------------------------------------------------------------------------------
# Reference results


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _setting_matches(setting: reference.Setting, runs: pd.DataFrame) -> bool | None:
    """Whether our runs used the setting's model and data; None when the runs table cannot tell."""
    models = _unique_text(runs, "cfg.model.name") + _unique_text(runs, "cfg.model.source")
    datasets = _unique_text(runs, "cfg.data.name") + _unique_text(runs, "cfg.data.source")
    if not models or not datasets:
        return None
    model_text, data_text = _normalise(" ".join(models)), _normalise(" ".join(datasets))
    return any(_normalise(k) in model_text for k in setting.model_keys) and any(
        _normalise(k) in data_text for k in setting.data_keys
    )


# Relative-change references are computed from these metrics of ours (first present wins).
CHANGE_METRICS = {
    "peak_memory_change": ("peak_cuda_allocated", "peak_rss"),
    "wall_time_change": ("wall_time",),
}


def _our_condition(ref: reference.ReferenceResult, runs: pd.DataFrame) -> tuple[str, str] | None:
    """(family, variant) of ours that a reference number corresponds to, if the study ran one."""
    families = runs.loc[runs["family_kind"] == ref.ours_kind, "family"].unique()
    for family in families:
        family_runs = runs[runs["family"] == family]
        variants = list(dict.fromkeys(family_runs["variant"]))
        if ref.ours_variant and ref.ours_variant in variants:
            return family, ref.ours_variant
        if ref.ours_method and "method" in family_runs.columns:
            with_method = list(
                dict.fromkeys(family_runs.loc[family_runs["method"] == ref.ours_method, "variant"])
            )
            baseline = stats.baseline_variant(runs, family)[0]
            if len(with_method) == 1:
                return family, with_method[0]
            if baseline in with_method:
                return family, baseline
    return None


def _reference_row(ref: reference.ReferenceResult, tables: dict) -> dict:
    runs, summary, tests = tables["runs"], tables["summary"], tables["tests"]
    row = {
        "label": md_text(ref.label),
        "what": md_text(
            f"{ref.split} {ref.metric.replace('_', ' ')}"
            if ref.split != "none"
            else ref.metric.replace("_", " ")
        ),
        "reference": _format_reference(ref),
        "ours": "not run here",
        "condition": "–",
        "verdict": "no counterpart in this study",
        "matched": False,
    }
    condition = _our_condition(ref, runs)
    if condition is None:
        return row
    family, variant = condition
    row["condition"] = md_text(f"{family}/{variant}")
    if ref.unit == "relative":
        return _relative_reference_row(ref, row, family, variant, summary, tests)
    ours = summary[
        (summary["family"] == family)
        & (summary["variant"] == variant)
        & (summary["metric"] == ref.metric)
        & (summary["split"] == ref.split)
        & (summary["stage"] == "final")
    ]
    if ours.empty:
        row["ours"] = "not measured"
        row["verdict"] = "our runs did not record this metric"
        return row
    s = ours.iloc[0]
    scale = UNIT_CONVERSIONS.get((ref.unit, str(s["unit"])))
    if scale is None:
        row["ours"] = fmt_value(s["mean"], str(s["unit"]))
        row["verdict"] = f"units differ ({ref.unit} vs {s['unit']}); not compared"
        return row
    row["matched"] = True
    n = int(s["n"])
    mean, low, high, std = (
        float(s[c]) * scale if _finite(s[c]) else math.nan for c in ("mean", "ci_low", "ci_high", "std")
    )
    if ref.unit == "count":
        row["ours"] = f"{_show(mean, ref.unit)}, n = {n}"
        same = round(mean) == round(ref.value)
        row["verdict"] = "identical" if same else f"differs: ours / theirs = {mean / ref.value:.3g}"
        return row
    interval = fmt_interval(low, high, lambda x: _show(x, ref.unit))
    row["ours"] = f"{_show(mean, ref.unit)} {interval if interval != '–' else ''}".strip() + f", n = {n}"
    if not (_finite(low) and _finite(high)):
        row["verdict"] = "ours has no interval (fewer than 2 runs)"
        return row
    gap = mean - ref.value
    gap_text = (
        fmt_points(gap) + " points" if ref.unit == "fraction" else _show(gap, ref.unit).replace("-", "−")
    )
    if low <= ref.value <= high:
        verdict = "inside our 95% CI"
    else:
        verdict = f"outside our 95% CI (ours {'higher' if gap > 0 else 'lower'} by {gap_text.lstrip('+−')})"
    if ref.std is not None and ref.n_runs >= 2:
        # Both sides are means over seeds: ask whether they differ beyond both spreads.
        p = stats.welch_from_summary(mean, std, n, ref.value, ref.std, ref.n_runs)
        if _finite(p):
            verdict += f"; Welch t on both means and spreads: {p_phrase(p)}"
            verdict += ", consistent" if p >= stats.ALPHA else ", they differ"
    elif not (low <= ref.value <= high):
        # A published single run scatters by the whole seed-to-seed spread, not by the standard error.
        single_low, single_high = stats.prediction_interval(mean, std, n)
        if _finite(single_low) and single_low <= ref.value <= single_high:
            verdict += "; but within the 95% range of a single run of ours"
    row["verdict"] = verdict
    return row


# (reference unit, our unit) -> factor from ours to theirs
UNIT_CONVERSIONS = {
    ("fraction", "fraction"): 1.0,
    ("count", "count"): 1.0,
    ("s", "s"): 1.0,
    ("GiB", "bytes"): 2.0**-30,
}


def _show(value: float, unit: str) -> str:
    if not _finite(value):
        return "–"
    if unit == "fraction":
        return f"{fmt_percent(value)}\u00a0%"
    if unit == "count":
        return fmt_count(value)
    if unit == "GiB":
        return f"{value:.2f} GiB"
    return f"{value:.3g} {unit}"


def _relative_reference_row(
    ref: reference.ReferenceResult,
    row: dict,
    family: str,
    variant: str,
    summary: pd.DataFrame,
    tests: pd.DataFrame,
) -> dict:
    for metric in CHANGE_METRICS.get(ref.metric, ()):
        test = tests[
            (tests["family"] == family) & (tests["variant"] == variant) & (tests["metric"] == metric)
        ]
        if test.empty:
            continue
        t = test.iloc[0]
        if not (_finite(t["mean_baseline"]) and t["mean_baseline"]):
            continue
        ratio = t["diff"] / t["mean_baseline"]
        low, high = t["diff_ci_low"] / t["mean_baseline"], t["diff_ci_high"] / t["mean_baseline"]
        row["matched"] = True
        row["condition"] = md_text(f"{family}/{variant} vs {t['baseline']} ({metric.replace('_', ' ')})")
        row["ours"] = (
            f"{fmt_value(ratio, 'relative')} {fmt_interval(low, high, lambda x: fmt_value(x, 'relative'))}"
        )
        if _finite(low) and _finite(high):
            # The interval is the difference's t interval over the baseline mean: approximate.
            row["verdict"] = (
                "inside our approx. 95% CI" if low <= ref.value <= high else "outside our approx. 95% CI"
            )
        else:
            row["verdict"] = "ours has no interval"
        return row
    row["ours"] = "not measured"
    row["verdict"] = "our runs did not record this metric"
    return row


def _format_reference(ref: reference.ReferenceResult) -> str:
    if ref.unit == "relative":
        return fmt_value(ref.value, "relative")
    if ref.std is None:
        return _show(ref.value, ref.unit)
    if ref.unit == "fraction":
        return f"{fmt_percent(ref.value, 1)} ± {ref.std * 100:.1f} % (n = {ref.n_runs})"
    return f"{_show(ref.value, ref.unit)} ± {ref.std:.3g} (n = {ref.n_runs})"


def _reference_sections(tables: dict) -> list[dict]:
    runs = tables["runs"]
    ours_model = ", ".join(_unique_text(runs, "cfg.model.name")) or "unknown model"
    ours_data = _data_description(runs)
    sections = []
    for setting in reference.SETTINGS.values():
        refs = reference.results_for(setting.key)
        if not refs:
            continue
        match = _setting_matches(setting, runs)
        if match is True:
            verdict = (
                "Same model and data source as ours, so these numbers are a direct check; data size, "
                "sequence length, recipe, hardware and library versions may still differ (ours are in "
                "the Setup section)."
            )
        elif match is False:
            verdict = (
                f"**Setting differs**: the reference used {md_text(setting.model)} on "
                f"{md_text(setting.data)}; we ran {md_text(ours_model)} on {md_text(ours_data)}. The "
                "comparison gives context, it is not a replication test, and a reference value outside our "
                "interval is expected."
            )
        else:
            verdict = (
                "Our runs table does not record the model or data name, so whether the setting matches is "
                "unknown."
            )
        rows = [_reference_row(ref, tables) for ref in refs]
        sections.append(
            {
                "title": md_text(setting.title),
                "sources": md_text("; ".join(dict.fromkeys(r.source for r in refs))),
                "model": md_text(setting.model),
                "data": md_text(setting.data),
                "hardware": md_text(setting.hardware),
                "runs": md_text(setting.runs),
                "same_setting": match,
                "setting_verdict": verdict,
                "rows": rows,
                "any_matched": any(r["matched"] for r in rows),
                "kinds": sorted({r.ours_kind for r in refs if r.ours_kind}),
                "notes": [md_text(n) for n in dict.fromkeys(f"{r.label}: {r.note}" for r in refs if r.note)],
            }
        )
    return sections


# ----------------------------------------------------------------------------------------------------
# Output


def _relative_url(path: Path, start: Path) -> str:
    relative = os.path.relpath(Path(path).resolve(), Path(start).resolve())
    return urllib.parse.quote(Path(relative).as_posix())


def _write_text_atomically(text: str, path: Path) -> None:
    with stats.atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,  # a misspelt field fails loudly instead of printing nothing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
    )


def render_markdown(
    tables: dict[str, pd.DataFrame], figures_dir: Path, out_dir: Path, meta: dict | None = None
) -> tuple[str, list[dict]]:
    """The report's Markdown and its family sections (for embedding figures), from loaded tables."""
    meta = dict(meta or {})
    runs = tables["runs"]
    families = _family_sections(tables, Path(figures_dir), Path(out_dir))
    context = {
        "title": md_text(meta.get("title") or DEFAULT_TITLE),
        "overview": _overview(runs, meta),
        "setup": _setup_rows(runs, meta),
        "families": families,
        "main_claims": [
            claim["text"]
            for family in families
            if family["kind"] != "epochs"
            for claim in family["claims"]
            if claim["verdict"] in ("better", "worse")
        ],
        "n_tested": int(
            (
                tables["tests"]["p_value"].notna()
                & (tables["tests"]["metric"] == PRIMARY_METRIC)
                & (tables["tests"]["split"] == PRIMARY_SPLIT)
            ).sum()
        ),
        "seed_rows": _seed_rows(tables["seed_consistency"]),
        "failed": _failed_runs(runs),
        "references": _reference_sections(tables),
        "caveats": [md_text(c) for c in reference.CAVEATS],
        "confidence": int(stats.CONFIDENCE * 100),
        "alpha": stats.ALPHA,
        "resamples": stats.BOOTSTRAP_RESAMPLES,
        "power": stats.TARGET_POWER,
    }
    return _environment().get_template("report.md.j2").render(**context), families


def _embed_figures(body: str, families: list[dict]) -> str:
    """Swap each figure's relative path for a base64 data URI so the HTML needs no other file."""
    for family in families:
        if family["figure"]:
            encoded = base64.b64encode(Path(family["figure_path"]).read_bytes()).decode("ascii")
            body = body.replace(f'src="{family["figure"]}"', f'src="data:image/png;base64,{encoded}"')
    return body


def build_report(
    tables_dir: str | Path, figures_dir: str | Path, out_dir: str | Path, meta: dict | None = None
) -> dict[str, Path]:
    """Write ``<out_dir>/report.md`` and a self-contained ``<out_dir>/report.html``; returns both paths.

    ``tables_dir`` holds runs, metrics, tests, summary and seed_consistency (``.parquet``);
    ``figures_dir`` the PNGs from ``lora_bench.plots.make_all_figures``. ``meta`` adds lines to the
    setup table (e.g. ``{"config": "config/default.yaml"}``) and may set ``title``.
    """
    tables_dir, figures_dir, out_dir = Path(tables_dir), Path(figures_dir), Path(out_dir)
    tables = _read_tables(tables_dir)
    text, families = render_markdown(tables, figures_dir, out_dir, meta)
    body = markdown.markdown(text, extensions=["tables", "toc", "sane_lists"], output_format="html")
    page = (
        _environment()
        .get_template("report.html.j2")
        .render(
            title=(meta or {}).get("title") or DEFAULT_TITLE,
            body=_embed_figures(body, families),
        )
    )
    paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    _write_text_atomically(text, paths["markdown"])
    _write_text_atomically(page, paths["html"])
    return paths


def snakemake_report_caption(kind: str) -> str:
    """reStructuredText caption for a family kind's figure, for Snakemake's ``report(..., caption=...)``."""
    caption = plots.figure_caption(kind)
    escaped = re.sub(r"([*`|_\\])", r"\\\1", caption)
    details = (
        "Diamonds or lines are means over seeds; error bars and bands are 95 % bootstrap confidence "
        "intervals (none where a condition has a single run); small dots are single seeds. Failed runs are "
        "left out."
    )
    return f"**{kind.replace('_', ' ')}** — {escaped}\n\n{details}\n"
