"""The study's report: ``paper/report.md`` and a self-contained ``paper/report.html``, from tables alone.

``build_report`` reads the tidy tables (``runs``, ``metrics``) and what ``lora_bench.analysis.stats`` derived from
them (``tests``, ``summary``, ``seed_consistency``) plus the figure files, and fills the Jinja2 template
``templates/report.md.j2``. It never recomputes statistics: a report that disagreed with the committed
tables would be worse than none, so a missing table is an error that names the command to run.

Every sentence that states a result is generated from a row of the tests table, with its interval,
test, Holm-adjusted p-value and number of seeds, and "no significant difference" is said as plainly
as a win. The reference section puts each published number (``lora_bench.report.reference``) beside ours and
says whether it lies inside our 95 % interval and whether the setting is the same at all.

Families of kind ``memory_time`` (QLoRA vs LoRA vs full: memory and time) get their own table from
``cost_summary`` and the tests table instead of an accuracy table (they usually evaluate no accuracy):
per variant the setting, memory, step time, throughput and base-weight bytes, and the memory and time
ratios to the baseline with Fieller intervals and Holm p-values, plus one generated sentence per variant
("qlora uses 0.62× the memory of lora ... and takes 1.31× the time per step"). A study without any
accuracy rows says so in its headline rather than claiming that no comparison could be tested.

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

from lora_bench.analysis import items, tuning, variance
from lora_bench.analysis.claims import INSTRUCT_CLAIMS, instruct_claims
from lora_bench.analysis.compare import baseline_variant, welch_from_summary
from lora_bench.analysis.cost import (
    COST_SUMMARY_COLUMNS,
    IMPL_RATIO_BLOCKS,
    IMPL_RATIO_PARTS,
    MEMORY_TIME_MEMORY_METRICS,
    MEMORY_TIME_TIME_METRIC,
    as_text,
)
from lora_bench.analysis.power import TARGET_POWER
from lora_bench.analysis.summary import ALPHA, BOOTSTRAP_RESAMPLES, CONFIDENCE, family_order, prediction_interval
from lora_bench.atomic import write_text
from lora_bench.report import figures, reference
from lora_bench.study import LORA_VARIANTS_KIND, MEMORY_TIME_OTHER_METRICS

TEMPLATES = Path(__file__).parent / "templates"
PRIMARY_METRIC, PRIMARY_SPLIT = "accuracy", "test"
COST_METRICS = ("wall_time", "median_step_time", "examples_per_second", "peak_rss", "peak_cuda_allocated")
# Kinds whose cost comparisons (time, memory) are worth a table; in a rank/alpha grid they are noise.
COST_KINDS = ("methods", "coverage", "optimizer", "memory_time", "generic")
ERROR_CHARS = 400
DEFAULT_TITLE = "lora-bench: LoRA finetuning with seeds and error bars"
REQUIRED_TABLES = ("runs", "metrics", "tests", "summary", "seed_consistency")
# ``cost_summary`` (from ``stats`` too) is read when present and required only by a memory_time study.
MEMORY_TIME = "memory_time"
GIB, MIB = 2.0**30, 2.0**20


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
    path = tables_dir / "cost_summary.parquet"
    if path.exists():
        tables["cost_summary"] = pd.read_parquet(path)
    elif (tables["runs"]["family_kind"] == MEMORY_TIME).any():
        raise FileNotFoundError(
            f"{path} is missing and the study has a memory_time family: run `python -m lora_bench stats` first"
        )
    else:
        tables["cost_summary"] = pd.DataFrame(columns=COST_SUMMARY_COLUMNS)
    _read_trust_tables(tables_dir, tables)
    path = tables_dir / "tuning.parquet"
    tables["tuning"] = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=tuning.TUNING_COLUMNS)
    for name, columns in ITEM_TABLES.items():
        path = tables_dir / f"{name}.parquet"
        tables[name] = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=columns)
    return tables


# lora_bench.analysis.items: read when present (a study whose runs kept no predictions has them empty).
ITEM_TABLES = {"item_tests": items.ITEM_TESTS_COLUMNS, "item_ranks": items.ITEM_RANKS_COLUMNS,
               "item_summary": items.ITEM_SUMMARY_COLUMNS}


def _item_test(tables: dict, family: str, variant: str):
    """The item-level test of a variant vs its baseline on test accuracy, or None when there is none."""
    tests = tables.get("item_tests")
    if tests is None or tests.empty:
        return None
    rows = tests[(tests["family"] == family) & (tests["variant"] == variant) & (tests["split"] == PRIMARY_SPLIT)]
    return rows.iloc[0] if len(rows) and _finite(rows.iloc[0]["p_value"]) else None


def _item_claim(test: pd.Series, item: pd.Series) -> str:
    """One sentence for a comparison by the item-level test, with the seed-level test beside it."""
    variant, baseline = f"**{md_text(test['variant'])}**", f"**{md_text(test['baseline'])}**"
    evidence = (f"95% CI {fmt_points(item['diff_ci_low'])} to {fmt_points(item['diff_ci_high'])}; "
                f"{item['test']}, Holm {p_phrase(item['p_holm'])}; n = {md_text(item['design'])}")
    if item["verdict"] == "better":
        sentence = f"{variant} beats {baseline}: {fmt_points(item['diff'])} points ({evidence})."
    elif item["verdict"] == "worse":
        sentence = f"{variant} is worse than {baseline}: {fmt_points(item['diff'])} points ({evidence})."
    else:
        sentence = (f"No significant difference between {variant} and {baseline}: {fmt_points(item['diff'])} points "
                    f"({evidence}).")
    if _finite(test["p_value"]):
        sentence += (f" Seed-level {test['test']}: {fmt_points(test['diff'])} points, Holm {p_phrase(test['p_holm'])}"
                     f" (n = {int(test['n_pairs']) if test['paired'] else int(test['n_variant'])} seeds).")
    if item["n_seeds"] and int(item["n_seeds"]) / max(int(item["n_strata"]), 1) < 3:
        sentence += (" With 2 seeds the item-level test is liberal when whole seeds shift a method's accuracy "
                     "(see the calibration in docs/tables.md).")
    if item["note"]:
        sentence += f" Note: {md_text(item['note'])}."
    return sentence


def _family_claims(tables: dict, family: str, primary_tests: pd.DataFrame) -> list[dict]:
    """Claims of a family: the item-level test where predictions exist, else the seed-level one."""
    claims = []
    for _, t in primary_tests.iterrows():
        item = _item_test(tables, family, t["variant"])
        if item is None:
            claims.append({"text": _claim(t), "verdict": t["verdict"], "convergence": t.get("convergence", "unknown")})
        else:
            claims.append({"text": _convergence_prefix(t) + _item_claim(t, item), "verdict": item["verdict"],
                           "convergence": t.get("convergence", "unknown")})
    return claims


def _item_rank_rows(ranks: pd.DataFrame) -> list[dict]:
    rows = []
    for r in ranks.drop_duplicates(["family", "split", "variant"]).itertuples():
        rows.append({"family": md_text(r.family), "variant": md_text(r.variant) + (" (baseline)" if r.is_baseline
                                                                                   else ""),
                     "mean": fmt_percent(r.mean), "p_rank1": f"{r.p_rank1:.2f}", "mean_rank": f"{r.mean_rank:.1f}",
                     "tie_group": r.tie_group, "n": f"{int(r.n_seeds)} seeds x {int(r.n_items)} items"})
    return rows


def _unique_text(runs: pd.DataFrame, column: str) -> list[str]:
    if column not in runs.columns:
        return []
    # A column that only some families set holds NaN elsewhere, which turns its integers into floats.
    values = runs[column].dropna().map(as_text)
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
    families = family_order(runs)
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
        # Finished runs whose record says its numbers may not repeat bit for bit (CUDA kernels).
        "n_not_bitwise": int((ok & (runs["bitwise_reproducible"] == False)).sum())  # noqa: E712 (None = unknown)
        if "bitwise_reproducible" in runs.columns else 0,
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
    # The split sizes the records say were used; the max_examples caps only for records from before sizes.
    sizes = [f"data.size.{split}" for split in ("train", "validation", "test")]
    caps = [f"cfg.data.max_examples.{split}" for split in ("train", "validation", "test")]
    if any(c in runs.columns for c in sizes):
        ok = runs[runs["status"] == "ok"] if "status" in runs else runs
        rows.append(("Examples used (train / validation / test)",
                     " / ".join(", ".join(md_text(v) for v in _unique_text(ok, c)) or "–" for c in sizes)))
    elif all(c in runs.columns for c in caps):
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


def _convergence_prefix(test: pd.Series) -> str:
    """What the learning diagnostics say about a comparison's runs, before its numbers (empty when they trained)."""
    state = str(test.get("convergence", "unknown"))
    if state == "inconclusive":
        counts = [f"{int(test[f'untrained_{side}'])} run(s) of {md_text(test[side])}"
                  for side in ("variant", "baseline") if int(test.get(f"untrained_{side}", 0) or 0)]
        return f"**Inconclusive: training did not converge** ({' and '.join(counts)} did not learn, collapsed, " \
               "diverged or did not plateau; see the runs listed below). "
    if state == "as_expected":
        return "**As expected**: the variant declares `expect: no_learning` and its runs did not train. "
    return ""


def _claim(test: pd.Series) -> str:
    """One sentence for one comparison of the primary metric, with its evidence."""
    return _convergence_prefix(test) + _claim_numbers(test)


def _claim_numbers(test: pd.Series) -> str:
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
        agrees = float(rank_p) < ALPHA
        sentence += f" The rank test ({test['nonparametric_test']}, Holm {p_phrase(rank_p)}) " + (
            "agrees." if agrees else "does not confirm it."
        )
    if test["note"]:
        sentence += f" Note: {md_text(test['note'])}."
    return sentence


def _rank_test_powerless(test: pd.Series) -> bool:
    """Whether the exact Wilcoxon test could not reach p < alpha with this many pairs, whatever the data."""
    return bool(test["paired"]) and 2.0 ** (1 - int(test["n_pairs"])) >= ALPHA


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
    family: str, runs: pd.DataFrame, summary: pd.DataFrame, tests: pd.DataFrame,
    item_summary: pd.DataFrame | None = None,
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
    for variant in figures.variant_order(runs, family):
        n_failed = int(((family_runs["variant"] == variant) & (family_runs["status"] != "ok")).sum())
        row = {"variant": md_text(variant), "n": "0", "mean": "–", "ci": "–", "params": "–"}
        if variant in primary.index:
            s = primary.loc[variant]
            row.update(
                n=str(int(s["n"])),
                mean=fmt_percent(s["mean"]),
                ci=fmt_interval(s["ci_low"], s["ci_high"], fmt_percent),
            )
        if item_summary is not None and len(item_summary):
            # The crossed items x seeds interval (logit scale, inside 0-100 %) where the runs kept predictions.
            found = item_summary[(item_summary["family"] == family) & (item_summary["variant"] == variant)
                                 & (item_summary["split"] == PRIMARY_SPLIT)]
            if len(found) and _finite(found.iloc[0]["ci_low"]):
                row["ci"] = fmt_interval(found.iloc[0]["ci_low"], found.iloc[0]["ci_high"], fmt_percent) + " (items)"
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
    for variant in figures.variant_order(runs, family):
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


def _cost_rows(family: str, tests: pd.DataFrame, shown: tuple[str, ...] = ()) -> list[dict]:
    """Relative cost changes vs the baseline, leaving out the metrics in ``shown`` (already reported)."""
    rows = []
    costs = tests[(tests["family"] == family) & tests["metric"].isin(COST_METRICS) & ~tests["metric"].isin(shown)]
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


# ----------------------------------------------------------------------------------------------------
# Memory and time families

MEMORY_LABELS = {
    "peak_cuda_allocated": "peak CUDA memory allocated",
    "state_bytes": "weights + gradients + optimizer state",
}


def fmt_ratio(x) -> str:
    """A ratio as a multiple: 0.6021 -> '0.60×', 0.0042 -> '0.0042×'."""
    if not _finite(x):
        return "–"
    x = float(x)
    return f"{x:.2f}×" if abs(x) >= 0.1 else f"{x:.2g}×"


def _fmt_scaled(value, scale: float) -> str:
    """``value / scale`` with three significant digits (whole numbers from 100 on)."""
    if not _finite(value):
        return "–"
    x = float(value) / scale
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _mean_and_interval(mean, low, high, scale: float) -> str:
    text = _fmt_scaled(mean, scale)
    if _finite(low) and _finite(high) and float(low) == float(high):
        return text  # identical in every run: an interval [x, x] says nothing
    interval = fmt_interval(low, high, lambda x: _fmt_scaled(x, scale))
    return f"{text} {interval}" if interval != "–" else text


def _cost_summary(tables: dict) -> pd.DataFrame:
    cost = tables.get("cost_summary")
    return cost if cost is not None else pd.DataFrame(columns=COST_SUMMARY_COLUMNS)


def _cost_test(tests: pd.DataFrame, family: str, variant: str, metric: str, baseline: str | None = None):
    """The tests row of one cost comparison (split ``none``), or None."""
    rows = tests[
        (tests["family"] == family)
        & (tests["variant"] == variant)
        & (tests["metric"] == metric)
        & (tests["split"] == "none")
    ]
    if baseline is not None:
        rows = rows[rows["baseline"] == baseline]
    return rows.iloc[0] if len(rows) else None


def _is_exact(test) -> bool:
    return bool(test.get("exact", False)) if test is not None else False


def _ratio_cells(test) -> tuple[str, str]:
    """(ratio with its 95 % interval, Holm p) of a cost comparison, for the table."""
    if test is None:
        return "–", "–"
    ratio = fmt_ratio(test.get("ratio"))
    if _is_exact(test):
        return f"{ratio} (exact)", "exact"
    interval = fmt_interval(test.get("ratio_ci_low"), test.get("ratio_ci_high"), fmt_ratio)
    return (f"{ratio} {interval}" if interval != "–" else ratio), fmt_p(test["p_holm"])


def _ratio_phrase(test, what: str, baseline: str, label: str = "") -> str | None:
    """'uses 0.60× the memory of **lora** (...)' and the like, with the evidence; None without a test row."""
    if test is None or not _finite(test.get("ratio")):
        return None
    exact = _is_exact(test)
    lead = what.format(ratio=("exactly " if exact else "") + fmt_ratio(test["ratio"]), baseline=baseline)
    details = [label] if label else []
    if exact:
        details.append("identical in every run of both")
        return f"{lead} ({'; '.join(details)})"
    if not _finite(test["p_value"]):
        details.append(f"not tested: {md_text(test['note']) or 'no p-value'}")
        return f"{lead} ({'; '.join(details)})"
    low, high = test.get("ratio_ci_low"), test.get("ratio_ci_high")
    if _finite(low) and _finite(high):
        details.append(f"95% CI {fmt_ratio(low)} to {fmt_ratio(high)}")
    evidence = f"{test['test']}, Holm {p_phrase(test['p_holm'])}"
    details.append(evidence + ("" if bool(test["significant"]) else ": no significant difference"))
    return f"{lead} ({'; '.join(details)})"


def _memory_time_claim(family: str, variant: str, baseline: str, tests: pd.DataFrame, memory: str) -> str:
    """One sentence per variant: its memory and time per step as multiples of the baseline's."""
    name, base = f"**{md_text(variant)}**", f"**{md_text(baseline)}**"
    memory_test = _cost_test(tests, family, variant, memory) if memory else None
    time_test = _cost_test(tests, family, variant, MEMORY_TIME_TIME_METRIC)
    time_what = "takes {ratio} the time per step" + ("" if memory_test is not None else " of {baseline}")
    parts = [
        _ratio_phrase(memory_test, "uses {ratio} the memory of {baseline}", base, MEMORY_LABELS.get(memory, memory)),
        _ratio_phrase(time_test, time_what, base),
    ]
    parts = [part for part in parts if part]
    if not parts:
        reason = "too few finished runs" if memory_test is None and time_test is None else "no ratio"
        return f"{name} vs {base}: memory and time were not compared ({reason})."
    reference_test = time_test if time_test is not None else memory_test
    if bool(reference_test["paired"]):
        n = f"n = {int(reference_test['n_pairs'])} seed pairs"
    else:
        n = f"n = {int(reference_test['n_variant'])} vs {int(reference_test['n_baseline'])} runs"
    return f"{name} {' and '.join(parts)}; {n}."


def _impl_rows(cost: pd.DataFrame) -> list[dict]:
    """Rows of ours / peft (``method.impl``): each variant with our layers beside its twin with peft's."""
    rows = []
    if "peft_variant" not in cost.columns:  # tables written before method.impl existed
        return rows
    for variant, c in cost[cost["peft_variant"].fillna("") != ""].iterrows():
        row = {"ours": md_text(variant), "peft": md_text(c["peft_variant"])}
        for prefix in IMPL_RATIO_BLOCKS:
            ratio, low, high = (c[f"{prefix}_{part}"] for part in IMPL_RATIO_PARTS)
            row[prefix] = (fmt_ratio(ratio) + (f" ({fmt_ratio(low)} to {fmt_ratio(high)})"
                                               if _finite(low) and _finite(high) else "")) if _finite(ratio) else "–"
        rows.append(row)
    return rows


def _memory_time_section(family: str, tables: dict) -> dict:
    """Table rows, sentences and notes of a memory_time family, from ``cost_summary`` and ``tests``."""
    runs, tests = tables["runs"], tables["tests"]
    cost = _cost_summary(tables)
    cost = cost[cost["family"] == family].set_index("variant")
    baseline = baseline_variant(runs, family)[0]
    memory = next((str(m) for m in cost["memory_metric"] if m), "") if len(cost) else ""
    rows, claims = [], []
    for variant in figures.variant_order(runs, family):
        if variant not in cost.index:
            continue
        c = cost.loc[variant]
        method = str(c["method"] or "")
        n = str(int(c["n"])) + (f" ({int(c['n_failed'])} failed)" if int(c["n_failed"]) else "")
        row = {
            "variant": md_text(variant),
            "method": md_text(method or "–"),
            "model": md_text(c["model"] or "–"),
            "optimizer": md_text(c["optimizer"] or "–"),
            "targets": "all weights" if method == "full" else md_text(c["targets"] or "–"),
            "seq_length": md_text(c["seq_length"] or "–"),
            "n": n,
            "memory": _mean_and_interval(c["memory_mean"], c["memory_ci_low"], c["memory_ci_high"], GIB),
            "time": _mean_and_interval(
                c["median_step_time_mean"], c["median_step_time_ci_low"], c["median_step_time_ci_high"], 1e-3
            ),
            "tokens": fmt_count(c["tokens_per_second_mean"]),
            "base_weights": _fmt_scaled(c["base_weight_bytes_mean"], MIB),
        }
        if variant == baseline:
            row.update(memory_ratio="baseline", memory_p="", time_ratio="baseline", time_p="")
        else:
            memory_test = _cost_test(tests, family, variant, memory) if memory else None
            time_test = _cost_test(tests, family, variant, MEMORY_TIME_TIME_METRIC)
            row["memory_ratio"], row["memory_p"] = _ratio_cells(memory_test)
            row["time_ratio"], row["time_p"] = _ratio_cells(time_test)
            if baseline:
                claims.append(_memory_time_claim(family, variant, baseline, tests, memory))
        rows.append(row)
    settings = []
    for label, column in (("device", "device"), ("precision", "precision")):
        values = [str(v) for v in dict.fromkeys(cost[column]) if v] if len(cost) else []
        if values:
            settings.append(f"{label}: {md_text(', '.join(values))}")
    return {
        "rows": rows,
        "impl_rows": _impl_rows(cost),
        "claims": claims,
        "memory_label": md_text(MEMORY_LABELS.get(memory, memory or "not recorded")),
        "memory_metric": memory,
        "settings": "; ".join(settings),
    }


# ----------------------------------------------------------------------------------------------------
# LoRA variants families (DoRA, LoRA+, inits): each variant's accuracy and costs against LoRA

LORA_VARIANTS = LORA_VARIANTS_KIND
KIB = 2.0**10


def _accuracy_phrase(test) -> str:
    """'test accuracy +0.40 points (95% CI -0.5 to 1.3; Holm p = 0.61)', or why it was not compared."""
    if test is None:
        return "test accuracy not compared (too few finished runs)"
    if not _finite(test["p_value"]):
        return f"test accuracy {fmt_points(test['diff'])} points (not tested: {md_text(test['note']) or 'no p-value'})"
    return (f"test accuracy {fmt_points(test['diff'])} points (95% CI {_points_interval(test)}; "
            f"Holm {p_phrase(test['p_holm'])})")


def _lora_variants_claim(family: str, variant: str, baseline: str, tables: dict, memory: str, cost,
                         base_cost) -> str:
    """One sentence per variant: accuracy difference, time and memory ratios, adapter size and serving overhead."""
    tests = tables["tests"]
    name, base = f"**{md_text(variant)}**", f"**{md_text(baseline)}**"
    accuracy = tests[(tests["family"] == family) & (tests["variant"] == variant)
                     & (tests["metric"] == PRIMARY_METRIC) & (tests["split"] == PRIMARY_SPLIT)]
    parts = [
        _accuracy_phrase(accuracy.iloc[0] if len(accuracy) else None),
        _ratio_phrase(_cost_test(tests, family, variant, MEMORY_TIME_TIME_METRIC),
                      "{ratio} the time per training step", base),
        _ratio_phrase(_cost_test(tests, family, variant, memory) if memory else None, "{ratio} the memory", base,
                      MEMORY_LABELS.get(memory, memory)),
        _ratio_phrase(_cost_test(tests, family, variant, "adapter_bytes"),
                      "an adapter file {ratio} as large" + (f" ({_fmt_scaled(cost['adapter_bytes_mean'], KIB)} KiB)"
                                                            if cost is not None else ""), base),
    ]
    if cost is not None and _finite(cost["inference_overhead_mean"]):
        baseline_cost = base_cost["inference_overhead_mean"] if base_cost is not None else math.nan
        parts.append(f"served unmerged it takes {fmt_ratio(cost['inference_overhead_mean'])} the merged model's "
                     f"time per example ({base}: {fmt_ratio(baseline_cost)})")
    parts = [part for part in parts if part]
    return f"{name} vs {base}: " + "; ".join(parts) + "."


def _ratio_and_interval(mean, low, high) -> str:
    interval = fmt_interval(low, high, fmt_ratio) if _finite(low) and _finite(high) and low != high else "–"
    return fmt_ratio(mean) + (f" {interval}" if interval != "–" else "")


def _lora_variants_section(family: str, tables: dict) -> dict:
    """Table rows and one sentence per variant of a lora_variants family, from ``cost_summary`` and ``tests``."""
    runs, tests = tables["runs"], tables["tests"]
    cost = _cost_summary(tables)
    cost = cost[cost["family"] == family].set_index("variant")
    baseline = baseline_variant(runs, family)[0]
    memory = next((str(m) for m in cost["memory_metric"] if m), "") if len(cost) else ""
    rows, claims = [], []
    for variant in figures.variant_order(runs, family):
        if variant not in cost.index:
            continue
        c = cost.loc[variant]
        row = {
            "variant": md_text(variant),
            "n": str(int(c["n"])) + (f" ({int(c['n_failed'])} failed)" if int(c["n_failed"]) else ""),
            "time": _mean_and_interval(c["median_step_time_mean"], c["median_step_time_ci_low"],
                                       c["median_step_time_ci_high"], 1e-3),
            "memory": _mean_and_interval(c["memory_mean"], c["memory_ci_low"], c["memory_ci_high"], MIB),
            "adapter": _mean_and_interval(c["adapter_bytes_mean"], c["adapter_bytes_ci_low"],
                                          c["adapter_bytes_ci_high"], KIB),
            "overhead": _ratio_and_interval(c["inference_overhead_mean"], c["inference_overhead_ci_low"],
                                            c["inference_overhead_ci_high"]),
            "latency": _mean_and_interval(c["inference_latency_unmerged_mean"], c["inference_latency_unmerged_ci_low"],
                                          c["inference_latency_unmerged_ci_high"], 1e-3),
        }
        if variant == baseline:
            row.update(time_ratio="baseline", memory_ratio="baseline", adapter_ratio="baseline")
        else:
            row["time_ratio"] = _ratio_cells(_cost_test(tests, family, variant, MEMORY_TIME_TIME_METRIC))[0]
            row["memory_ratio"] = _ratio_cells(_cost_test(tests, family, variant, memory) if memory else None)[0]
            row["adapter_ratio"] = _ratio_cells(_cost_test(tests, family, variant, "adapter_bytes"))[0]
            if baseline:
                claims.append(_lora_variants_claim(family, variant, baseline, tables, memory, c,
                                                   cost.loc[baseline] if baseline in cost.index else None))
        rows.append(row)
    return {"rows": rows, "claims": claims, "baseline": md_text(baseline or "none"),
            "memory_label": md_text(MEMORY_LABELS.get(memory, memory or "not recorded"))}


# Metrics the memory_time table already reports; the generic cost table leaves them out for these families.
MEMORY_TIME_SHOWN = ("median_step_time", *MEMORY_TIME_MEMORY_METRICS, *MEMORY_TIME_OTHER_METRICS)


def _has_primary(summary: pd.DataFrame, family: str) -> bool:
    """Whether the family has any test accuracy from finished runs."""
    primary = (summary["metric"] == PRIMARY_METRIC) & (summary["split"] == PRIMARY_SPLIT)
    return bool((primary & (summary["family"] == family)).any())


def _summary_cell(summary: pd.DataFrame, family: str, variant: str, metric: str, split: str, stage: str,
                  formatter=fmt_percent) -> str:
    match = summary[(summary["family"] == family) & (summary["variant"] == variant) & (summary["metric"] == metric)
                    & (summary["split"] == split) & (summary["stage"] == stage)]
    if match.empty:
        return "–"
    s = match.iloc[0]
    interval = fmt_interval(s["ci_low"], s["ci_high"], formatter)
    return f"{formatter(s['mean'])} {interval}" if interval != "–" else formatter(s["mean"])


def _gain_cell(summary, family, variant) -> str:
    return _summary_cell(summary, family, variant, "accuracy_gain", "test", "final", fmt_points)


def _ppl_cell(summary, family, variant, stage) -> str:
    return _summary_cell(summary, family, variant, "perplexity", "test", stage, lambda x: f"{x:.3g}")


SUPPORT_WORDS = {"supported": "supported", "contradicted": "contradicted", "not shown": "not shown (n.s.)"}


def _instruct_section(family: str, tables: dict) -> dict:
    """Zero-shot vs finetuned per variant, and each reference-B claim with n, CI, Holm p and a verdict."""
    runs, summary, metrics = tables["runs"], tables["summary"], tables["metrics"]
    rows = []
    for variant in figures.variant_order(runs, family):
        rows.append({
            "variant": md_text(variant),
            "zero_shot": _summary_cell(summary, family, variant, "accuracy", "test", "zero_shot"),
            "final": _summary_cell(summary, family, variant, "accuracy", "test", "final"),
            "gain": _gain_cell(summary, family, variant),
            "ppl_zero": _ppl_cell(summary, family, variant, "zero_shot"),
            "ppl": _ppl_cell(summary, family, variant, "final"),
        })
    epoch_rows = []
    per_epoch = figures.per_epoch_with_zero_shot(metrics[metrics["family"] == family], "accuracy", "test")
    multi = [v for v in figures.variant_order(runs, family)
             if len(per_epoch) and (per_epoch[per_epoch["variant"] == v]["epoch"].astype(int) >= 2).any()]
    for variant in multi:
        part = per_epoch[per_epoch["variant"] == variant].sort_values("epoch")
        for s in part.itertuples():
            epoch_rows.append({"variant": md_text(variant),
                               "epoch": "0 (zero-shot)" if int(s.epoch) == 0 else str(int(s.epoch)),
                               "n": str(int(s.n)), "accuracy": fmt_percent(s.mean),
                               "ci": fmt_interval(s.ci_low, s.ci_high, fmt_percent)})
    claims = []
    for c in instruct_claims(metrics, runs).query("family == @family").itertuples():
        accuracy = c.metric in ("accuracy", "lm_eval")
        number = fmt_points if accuracy else (lambda x: fmt_signed(x, 3))
        diff = f"{number(c.diff)} {fmt_interval(c.diff_ci_low, c.diff_ci_high, number)}" if _finite(c.diff) else "–"
        n = f"{int(c.n_pairs)} pairs" if c.paired else (f"{int(c.n_pairs)} common seeds" if c.n_pairs else "–")
        claims.append({"statement": md_text(c.statement), "comparison": md_text(c.comparison),
                       "metric": (f"test {c.metric}" if c.metric != "lm_eval" else "LM harness mean")
                       + (" (points)" if accuracy else " (nats)"),
                       "n": n, "diff": diff, "p": fmt_p(c.p_holm),
                       "verdict": SUPPORT_WORDS.get(c.support, c.support) if _finite(c.p_value)
                       else f"not tested: {md_text(c.note) or 'no p-value'}"})
    tested = {c["statement"] for c in claims}
    missing = [md_text(text) for _, text in INSTRUCT_CLAIMS if md_text(text) not in tested]
    return {"rows": rows, "epoch_rows": epoch_rows, "claims": claims, "untested": missing}


FLAG_WORDS = {"learned": "did not learn", "collapsed": "collapsed", "diverged": "diverged",
              "plateaued": "did not plateau"}


def _learning_rows(runs: pd.DataFrame, family: str) -> list[dict]:
    """Finished runs of the family that did not train, one row per run, with what the diagnostics say."""
    if "trained" not in runs:
        return []
    flagged = runs[(runs["family"] == family) & (runs["status"] == "ok") & (runs["trained"] == False)]  # noqa: E712
    rows = []
    for run in flagged.itertuples():
        flags = [word for flag, word in FLAG_WORDS.items()
                 if getattr(run, flag) is not None and bool(getattr(run, flag)) != (flag in ("learned", "plateaued"))]
        rows.append({"run": md_text(run.run_id), "flags": ", ".join(flags),
                     "expected": "yes (expect: no_learning)" if getattr(run, "expect", "") == "no_learning" else "no",
                     "p": fmt_p(run.learned_p) if _finite(getattr(run, "learned_p", None)) else "–"})
    return rows


def _tune_section(family: str, tables: dict) -> dict | None:
    """A tuning family's chosen values, scores per value and budget (lora_bench.analysis.tuning)."""
    table = tables.get("tuning")
    if table is None or table.empty:
        return None
    part = table[table["tuning_family"] == family]
    if part.empty:
        return None
    runs = tables["runs"]
    family_runs = runs[runs["family"] == family]
    rows = [{"setting": md_text(r.setting), "value": f"{r.value:g}", "n": int(r.n_runs - r.n_failed),
             "score": fmt_percent(r.mean), "chosen": "**chosen**" if r.chosen else ""} for r in part.itertuples()]
    epochs = part["epochs"].iloc[0]
    n_variants = part["setting"].nunique()
    budget = (f"{len(part) // max(1, n_variants)} values x {n_variants} variants x "
              f"{int(family_runs['seed'].nunique())} tuning seed(s) = {len(family_runs)} runs"
              f"{f' of {int(epochs)} epoch(s)' if _finite(epochs) else ''}, the same for every variant; validation "
              "split only (the test split was not evaluated)")
    return {"tuned": md_text(part["family"].iloc[0]), "key": md_text(part["key"].iloc[0]),
            "metric": md_text(part["metric"].iloc[0]), "rows": rows, "budget": budget}


def _family_sections(tables: dict, figures_dir: Path, out_dir: Path) -> list[dict]:
    runs, summary, tests = tables["runs"], tables["summary"], tables["tests"]
    sections = []
    for family in family_order(runs):
        kind = str(runs.loc[runs["family"] == family, "family_kind"].iloc[0])
        if kind in TRUST_KINDS:
            continue  # shown in "How much to trust a single run"
        png = figures_dir / f"{figures.figure_stem(family)}.png"
        primary_tests = tests[
            (tests["family"] == family)
            & (tests["metric"] == PRIMARY_METRIC)
            & (tests["split"] == PRIMARY_SPLIT)
        ]
        memory_time = kind == MEMORY_TIME
        # A memory_time family usually evaluates no accuracy: no accuracy table of dashes for it.
        show_accuracy = (not memory_time or _has_primary(summary, family)) and kind != TUNE_KIND
        sections.append(
            {
                "name": md_text(family),
                "anchor": family,
                "kind": kind,
                "caption": md_text(figures.figure_caption(kind)),
                "figure": _relative_url(png, out_dir) if png.exists() else None,
                "figure_path": png,
                "show_accuracy": show_accuracy,
                "rows": _condition_rows(family, runs, summary, tests, tables.get("item_summary"))
                if kind != "epochs" and show_accuracy else [],
                "final_rows": _condition_rows(family, runs, summary, tests.iloc[0:0])
                if kind == "epochs"
                else [],
                "epoch_rows": _epoch_rows(family, runs, summary, tests) if kind == "epochs" else [],
                "claims": _family_claims(tables, family, primary_tests),
                "learning": _learning_rows(runs, family),
                "tune": _tune_section(family, tables) if kind == TUNE_KIND else None,
                "rank_note": _rank_note(primary_tests[primary_tests["p_value"].notna()]),
                "cost_rows": (
                    _cost_rows(family, tests, MEMORY_TIME_SHOWN if memory_time else ()) if kind in COST_KINDS else []
                ),
                "memory_time": _memory_time_section(family, tables) if memory_time else None,
                "lora_variants": _lora_variants_section(family, tables) if kind == LORA_VARIANTS else None,
                "instruct": _instruct_section(family, tables) if kind == "instruct" else None,
                "baseline": md_text(baseline_variant(runs, family)[0] or "none"),
            }
        )
    return sections


# ----------------------------------------------------------------------------------------------------
# How much to trust a single run (variance and sweep families; lora_bench.analysis.variance)

TRUST_KINDS = (variance.VARIANCE_KIND, variance.SWEEP_KIND)
TUNE_KIND = tuning.TUNE_KIND
TRUST_TABLES = {
    "variance_components": variance.VARIANCE_COLUMNS,
    "sweep_reeval": variance.REEVAL_COLUMNS,
    "sweep_summary": variance.SUMMARY_COLUMNS,
}


def _read_trust_tables(tables_dir: Path, tables: dict) -> None:
    has_trust = tables["runs"]["family_kind"].isin(TRUST_KINDS).any()
    for name, columns in TRUST_TABLES.items():
        path = tables_dir / f"{name}.parquet"
        if path.exists():
            tables[name] = pd.read_parquet(path)
        elif has_trust:
            raise FileNotFoundError(
                f"{path} is missing and the study has a variance or sweep family: run `python -m lora_bench stats`"
            )
        else:
            tables[name] = pd.DataFrame(columns=columns)


def _pct_ci(value, low, high, decimals: int = 2) -> str:
    shown = fmt_percent(value, decimals)
    interval = fmt_interval(low, high, lambda x: fmt_percent(x, decimals))
    return shown if interval == "–" else f"{shown} {interval}"


def _points_ci(value, low, high) -> str:
    interval = fmt_interval(low, high, fmt_points)
    return fmt_points(value) if interval == "–" else f"{fmt_points(value)} {interval}"


def _variance_rows(components: pd.DataFrame) -> list[dict]:
    rows = []
    for c in components.itertuples():
        rows.append({
            "family": md_text(c.family),
            "setting": md_text(c.setting),
            "design": f"{int(c.n_data_seeds)} × {int(c.n_train_seeds)} ({int(c.n_runs)} runs)",
            "mean": fmt_percent(c.mean),
            "sd_data": _pct_ci(c.sd_data, c.sd_data_ci_low, c.sd_data_ci_high),
            "sd_train": _pct_ci(c.sd_train, c.sd_train_ci_low, c.sd_train_ci_high),
            "sd_residual": _pct_ci(c.sd_residual, c.sd_residual_ci_low, c.sd_residual_ci_high),
            "share_data": _pct_ci(c.share_data, c.share_data_ci_low, c.share_data_ci_high, 0),
            "share_train": _pct_ci(c.share_train, c.share_train_ci_low, c.share_train_ci_high, 0),
            "note": md_text(c.note) if isinstance(c.note, str) else "",
        })
    return rows


def _sweep_sentences(summary: pd.DataFrame, family: str) -> list[str]:
    by_split = {r.split: r for r in summary[summary["family"] == family].itertuples()}
    val, test = by_split.get("validation"), by_split.get("test")
    if val is None:
        return []
    winner = f"**{md_text(val.winner)}**"
    out = [f"The sweep ran {int(val.n_configs)} configurations once each; its winner by validation accuracy, "
           f"{winner}, scored {fmt_percent(val.winner_sweep_score)} % on validation"
           + (f" and {fmt_percent(test.winner_sweep_score)} % on test." if test is not None else ".")]
    if not _finite(val.winner_rerun_mean):
        out.append("The winner has no finished re-runs, so its optimism cannot be measured.")
        return out
    per = int(val.n_reruns / max(1, val.top_k))
    rerun_val = _pct_ci(val.winner_rerun_mean, val.winner_rerun_ci_low, val.winner_rerun_ci_high)
    text = (f"Re-run about {per} times on fresh train and data seeds it averages {rerun_val} % on validation: "
            f"the **optimism** of the single-run pick is "
            f"{_points_ci(val.optimism, val.optimism_ci_low, val.optimism_ci_high)} points")
    if test is not None and _finite(test.optimism):
        rerun_test = _pct_ci(test.winner_rerun_mean, test.winner_rerun_ci_low, test.winner_rerun_ci_high)
        text += (f" on validation and {_points_ci(test.optimism, test.optimism_ci_low, test.optimism_ci_high)} "
                 f"points on test (re-run test mean {rerun_test} %)")
    out.append(text + " (95% t intervals over the re-runs).")
    still = bool(val.winner_still_best) if not pd.isna(val.winner_still_best) else False
    out.append(
        (f"After re-running, the winner is **still the best** of the top {int(val.top_k)} on validation"
         if still else f"After re-running, the winner is **no longer the best** of the top {int(val.top_k)} on "
         f"validation (best: **{md_text(val.rerun_best)}**)")
        + f"; it has the highest re-run mean in {fmt_percent(val.p_winner_best, 0)} % of bootstrap resamples of "
        "the re-runs."
    )
    differ = ("the re-runs show a significant difference among them" if bool(val.differ)
              else "the re-runs show no significant difference among them")
    out.append(
        f"Across the top {int(val.top_k)}, sweep scores average {fmt_percent(val.topk_sweep_mean)} % and their re-runs "
        f"{fmt_percent(val.topk_rerun_mean)} %: a regression toward the mean of "
        f"{_points_ci(val.topk_optimism, val.topk_optimism_ci_low, val.topk_optimism_ci_high)} points"
        + (f" (slope of re-run mean on sweep score {val.slope:.2f})" if _finite(val.slope) else "")
        + f"; {differ} (F test of configuration, blocked on data and train seed, {p_phrase(val.differ_p)})."
    )
    return out


def _sweep_rows(reeval: pd.DataFrame, family: str) -> list[dict]:
    part = reeval[(reeval["family"] == family) & reeval["in_top_k"].astype(bool)]
    rows = []
    for r in part[part["split"] == "validation"].itertuples():
        t = part[(part["split"] == "test") & (part["setting"] == r.setting)]
        t = next(t.itertuples(), None)
        rows.append({
            "rank": str(int(r.sweep_rank)),
            "setting": md_text(r.setting) + (" (winner)" if r.is_winner else ""),
            "n": str(int(r.n_rerun)),
            "sweep_val": fmt_percent(r.sweep_score),
            "rerun_val": _pct_ci(r.rerun_mean, r.rerun_ci_low, r.rerun_ci_high),
            "optimism_val": _points_ci(r.optimism, r.optimism_ci_low, r.optimism_ci_high),
            "sweep_test": fmt_percent(t.sweep_score) if t is not None else "–",
            "rerun_test": _pct_ci(t.rerun_mean, t.rerun_ci_low, t.rerun_ci_high) if t is not None else "–",
            "p_best": fmt_percent(r.p_best, 0),
        })
    return rows


def _trust_section(tables: dict, figures_dir: Path, out_dir: Path) -> dict | None:
    runs = tables["runs"]
    families = [f for f in family_order(runs)
                if str(runs.loc[runs["family"] == f, "family_kind"].iloc[0]) in TRUST_KINDS]
    if not families:
        return None
    entries = []
    for family in families:
        kind = str(runs.loc[runs["family"] == family, "family_kind"].iloc[0])
        png = figures_dir / f"{figures.figure_stem(family)}.png"
        entries.append({
            "name": md_text(family),
            "kind": kind,
            "caption": md_text(figures.figure_caption(kind)),
            "figure": _relative_url(png, out_dir) if png.exists() else None,
            "figure_path": png,
            "sentences": _sweep_sentences(tables["sweep_summary"], family) if kind == variance.SWEEP_KIND else [],
            "rows": _sweep_rows(tables["sweep_reeval"], family) if kind == variance.SWEEP_KIND else [],
        })
    return {
        "families": entries,
        "variance_rows": _variance_rows(tables["variance_components"]),
        "resamples": variance.VC_RESAMPLES,
    }


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
                "seeds_items": _fmt_seeds(getattr(s, "seeds_for_1pt_items", math.nan)),
            }
        )
    return rows


def _fmt_seeds(value) -> str:
    if value is not None and not pd.isna(value) and math.isinf(float(value)):
        return "∞"
    return fmt_count(value)


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


def _relevant_runs(runs: pd.DataFrame, refs: list[reference.ReferenceResult]) -> pd.DataFrame:
    """Our runs of the family kinds a setting's numbers map to (all runs when the study has none of those)."""
    kinds = {r.ours_kind for r in refs if r.ours_kind}
    relevant = runs[runs["family_kind"].isin(kinds)]
    return relevant if len(relevant) else runs


def _setting_matches(setting: reference.Setting, runs: pd.DataFrame) -> bool | None:
    """Whether our runs used the setting's model, data and device; None when the runs table cannot tell.

    Every model name of ours must be the setting's (a study mixing a tiny and a 7B model is not "the
    same setting"); the data need to match only when the setting names data (``data_keys``), and the
    device only when it names devices (``device_keys``, e.g. CUDA for GPU memory and time).
    """
    models = _unique_text(runs, "cfg.model.name") or _unique_text(runs, "cfg.model.source")
    datasets = _unique_text(runs, "cfg.data.name") + _unique_text(runs, "cfg.data.source")
    devices = _unique_text(runs, "device")
    if not models or (setting.data_keys and not datasets) or (setting.device_keys and not devices):
        return None
    model_keys = [_normalise(k) for k in setting.model_keys]
    same_model = all(any(k in _normalise(m) for k in model_keys) for m in models)
    data_text = _normalise(" ".join(datasets))
    same_data = not setting.data_keys or any(_normalise(k) in data_text for k in setting.data_keys)
    same_device = not setting.device_keys or all(any(k in d.lower() for k in setting.device_keys) for d in devices)
    return same_model and same_data and same_device


# Relative-change references are computed from these metrics of ours (first present wins).
CHANGE_METRICS = {
    "peak_memory_change": ("peak_cuda_allocated", "peak_rss"),
    "wall_time_change": ("wall_time",),
    "memory_ratio": ("peak_cuda_allocated", "peak_rss"),
    "step_time_ratio": ("median_step_time",),
}
# In memory_time families the memory references use the family's memory metric and the time references the
# median step time (setup and evaluation would blur a wall-clock ratio).
MEMORY_REFERENCES = ("peak_memory_change", "memory_ratio")
TIME_REFERENCES = ("wall_time_change", "step_time_ratio")
RATIO_UNITS = ("relative", "ratio")


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
            baseline = baseline_variant(runs, family)[0]
            if len(with_method) == 1:
                return family, with_method[0]
            if baseline in with_method:
                return family, baseline
    return None


def _reference_row(ref: reference.ReferenceResult, tables: dict, same_setting: bool | None = None) -> dict:
    """One row of a reference table: the published number, ours, and whether they agree.

    ``same_setting`` (from ``_setting_matches``) matters for settings whose absolute numbers are
    comparable only in the same setting: elsewhere they are shown but not compared.
    """
    runs, summary = tables["runs"], tables["summary"]
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
    if ref.unit in RATIO_UNITS:
        return _ratio_reference_row(ref, row, family, variant, tables)
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
    if reference.SETTINGS[ref.setting].absolute_needs_same_setting and same_setting is not True:
        row["ours"] = fmt_value(s["mean"], str(s["unit"])) + f", n = {int(s['n'])}"
        row["verdict"] = "setting differs: absolute values not compared (see the ratios)"
        return row
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
        p = welch_from_summary(mean, std, n, ref.value, ref.std, ref.n_runs)
        if _finite(p):
            verdict += f"; Welch t on both means and spreads: {p_phrase(p)}"
            verdict += ", consistent" if p >= ALPHA else ", they differ"
    elif not (low <= ref.value <= high):
        # A published single run scatters by the whole seed-to-seed spread, not by the standard error.
        single_low, single_high = prediction_interval(mean, std, n)
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


def _ratio_metrics(ref: reference.ReferenceResult, family: str, kind: str, tables: dict) -> list[str]:
    """Our metrics a relative / ratio reference may be computed from, first choice first."""
    if kind == MEMORY_TIME and ref.metric in MEMORY_REFERENCES:
        cost = _cost_summary(tables)
        memory = next((str(m) for m in cost.loc[cost["family"] == family, "memory_metric"] if m), "")
        return [memory] if memory else list(MEMORY_TIME_MEMORY_METRICS)
    if kind == MEMORY_TIME and ref.metric in TIME_REFERENCES:
        return [MEMORY_TIME_TIME_METRIC]
    return list(CHANGE_METRICS.get(ref.metric, ()))


def _cost_means(tables: dict, family: str, variant: str, versus: str, metric: str) -> tuple[float, float]:
    """Means of ``metric`` for two variants of a memory_time family from ``cost_summary`` (NaN if absent)."""
    cost = _cost_summary(tables)
    cost = cost[cost["family"] == family].set_index("variant")
    if variant not in cost.index or versus not in cost.index:
        return math.nan, math.nan
    prefix = "memory" if metric == cost.loc[variant, "memory_metric"] else metric
    column = f"{prefix}_mean"
    if column not in cost.columns:
        return math.nan, math.nan
    return float(cost.loc[variant, column]), float(cost.loc[versus, column])


def _ratio_reference_row(
    ref: reference.ReferenceResult, row: dict, family: str, variant: str, tables: dict
) -> dict:
    """A relative change or ratio of the reference (e.g. QLoRA vs LoRA memory) beside ours, as ratios.

    Ours is the tests table's ratio with its Fieller interval when ``ours_versus`` is the family's baseline;
    otherwise the ratio of the two means from ``cost_summary``, without an interval.
    """
    runs, tests = tables["runs"], tables["tests"]
    kind = str(runs.loc[runs["family"] == family, "family_kind"].iloc[0])
    versus = ref.ours_versus or baseline_variant(runs, family)[0] or ""
    theirs = ref.value + 1 if ref.unit == "relative" else ref.value
    for metric in _ratio_metrics(ref, family, kind, tables):
        condition = md_text(f"{family}/{variant} vs {versus} ({metric.replace('_', ' ')})")
        t = _cost_test(tests, family, variant, metric, versus)
        if t is not None and _finite(t["mean_baseline"]) and t["mean_baseline"]:
            if _finite(t.get("ratio")):
                ratio, low, high, approx = t["ratio"], t.get("ratio_ci_low"), t.get("ratio_ci_high"), ""
            else:  # a tests table from before the ratio columns: the difference's interval over the baseline
                base = t["mean_baseline"]
                ratio, low, high = 1 + t["diff"] / base, 1 + t["diff_ci_low"] / base, 1 + t["diff_ci_high"] / base
                approx = "approx. "
            row.update(matched=True, condition=condition)
            interval = "" if _is_exact(t) else fmt_interval(low, high, fmt_ratio)
            relative = fmt_value(float(ratio) - 1, "relative")
            row["ours"] = " ".join(x for x in (fmt_ratio(ratio), interval, f"({relative})") if x and x != "–")
            if _is_exact(t):
                same = math.isclose(float(ratio), theirs, rel_tol=5e-3)
                row["verdict"] = "ours is exact (identical in every run): " + (
                    "the same" if same else f"ours {'higher' if ratio > theirs else 'lower'}"
                )
            elif _finite(low) and _finite(high):
                inside = float(low) <= theirs <= float(high)
                row["verdict"] = (
                    f"inside our {approx}95% CI"
                    if inside
                    else f"outside our {approx}95% CI (ours {'higher' if ratio > theirs else 'lower'})"
                )
            else:
                row["verdict"] = "ours has no interval"
            if ref.metric == "wall_time_change" and metric == MEMORY_TIME_TIME_METRIC:
                row["verdict"] += "; ours is time per step, theirs total training time"
            if metric == "state_bytes":
                row["verdict"] += "; ours counts weights, gradients and optimizer state, theirs peak memory"
            return row
        mean, mean_versus = _cost_means(tables, family, variant, versus, metric)
        if _finite(mean) and _finite(mean_versus) and mean_versus:
            row.update(matched=True, condition=condition)
            row["ours"] = f"{fmt_ratio(mean / mean_versus)} ({fmt_value(mean / mean_versus - 1, 'relative')})"
            row["verdict"] = f"ours has no interval: {md_text(versus)} is not this family's baseline, so not tested"
            return row
    row["ours"] = "not measured"
    row["verdict"] = "our runs did not record this metric, or not for both variants"
    return row


def _format_reference(ref: reference.ReferenceResult) -> str:
    if ref.unit == "relative":
        return f"{fmt_value(ref.value, 'relative')} ({fmt_ratio(ref.value + 1)})"
    if ref.unit == "ratio":
        return fmt_ratio(ref.value)
    if ref.std is None:
        return _show(ref.value, ref.unit)
    if ref.unit == "fraction":
        return f"{fmt_percent(ref.value, 1)} ± {ref.std * 100:.1f} % (n = {ref.n_runs})"
    return f"{_show(ref.value, ref.unit)} ± {ref.std:.3g} (n = {ref.n_runs})"


def _setting_verdict(
    setting: reference.Setting, refs: list[reference.ReferenceResult], runs: pd.DataFrame, match: bool | None
) -> str:
    """Whether the reference's setting is ours, in words, and what that means for the comparison."""
    ours_model = ", ".join(_unique_text(runs, "cfg.model.name")) or "unknown model"
    ours_where = _data_description(runs)
    if setting.device_keys:
        ours_where += f", on {', '.join(_unique_text(runs, 'device')) or 'an unknown device'}"
    only_ratios = setting.absolute_needs_same_setting or all(r.unit in RATIO_UNITS for r in refs)
    details = f" (theirs: {md_text(setting.details)})" if setting.details else ""
    if match is True and setting.device_keys and not setting.data_keys:
        return (
            f"Same model config as ours ({md_text(setting.model)}) on a CUDA device, so the absolute numbers are a "
            f"check; the GPU model, sequence length, batch, precision and library versions may still differ"
            f"{details}: ours are in the Setup section and the family's memory and time table."
        )
    if match is True:
        return (
            "Same model and data source as ours, so these numbers are a direct check; data size, "
            "sequence length, recipe, hardware and library versions may still differ (ours are in "
            f"the Setup section){details}."
        )
    if match is False:
        tail = (
            " Absolute memory and time depend on the model's size, sequence length, batch and hardware, so only "
            "the ratios (QLoRA vs LoRA) are compared, and even those are context, not a replication test."
            if only_ratios
            else " The comparison gives context, it is not a replication test, and a reference value outside "
            "our interval is expected."
        )
        return (
            f"**Setting differs**: the reference used {md_text(setting.model)} on {md_text(setting.data)} "
            f"({md_text(setting.hardware)}); we ran {md_text(ours_model)} on {md_text(ours_where)}.{tail}"
        )
    return (
        "Our runs table does not record the model, data or device, so whether the setting matches is unknown."
        + (" Only the ratios are compared." if only_ratios else "")
    )


def _reference_sections(tables: dict) -> list[dict]:
    runs = tables["runs"]
    sections = []
    for setting in reference.SETTINGS.values():
        refs = reference.results_for(setting.key)
        if not refs:
            continue
        relevant = _relevant_runs(runs, refs)
        match = _setting_matches(setting, relevant)
        verdict = _setting_verdict(setting, refs, relevant, match)
        rows = [_reference_row(ref, tables, match) for ref in refs]
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
    trust = _trust_section(tables, Path(figures_dir), Path(out_dir))
    summary = tables["summary"]
    kinds = {f["kind"] for f in families}
    context = {
        # A study of memory_time families only may have no accuracy anywhere; the prose then says so.
        "has_accuracy": bool(((summary["metric"] == PRIMARY_METRIC) & (summary["split"] == PRIMARY_SPLIT)).any()),
        "has_memory_time": MEMORY_TIME in kinds,
        "cost_only": kinds == {MEMORY_TIME},
        "cost_claims": [claim for f in families if f["memory_time"] for claim in f["memory_time"]["claims"]],
        "title": md_text(meta.get("title") or DEFAULT_TITLE),
        "overview": _overview(runs, meta),
        "setup": _setup_rows(runs, meta),
        "families": families,
        "trust": trust,
        "main_claims": [
            claim["text"]
            for family in families
            if family["kind"] != "epochs"
            for claim in family["claims"]
            # A difference between runs that did not train measures the budget, not the method.
            if claim["verdict"] in ("better", "worse") and claim["convergence"] in ("trained", "unknown")
        ],
        "n_inconclusive": sum(claim["convergence"] == "inconclusive" for family in families
                              for claim in family["claims"]),
        "n_significant_untrained": sum(
            claim["convergence"] == "inconclusive" and claim["verdict"] in ("better", "worse")
            for family in families for claim in family["claims"]
        ),
        "n_tested": int(
            (
                tables["tests"]["p_value"].notna()
                & (tables["tests"]["metric"] == PRIMARY_METRIC)
                & (tables["tests"]["split"] == PRIMARY_SPLIT)
            ).sum()
        ),
        "seed_rows": _seed_rows(tables["seed_consistency"]),
        "has_items": not tables["item_tests"].empty,
        "item_ranks": _item_rank_rows(tables["item_ranks"]),
        "item_ranks_figure": _relative_url(Path(figures_dir) / f"{figures.ITEM_RANKS_FIGURE}.png", Path(out_dir))
        if (Path(figures_dir) / f"{figures.ITEM_RANKS_FIGURE}.png").exists() else None,
        "item_resamples": items.RANK_RESAMPLES,
        "converged": tables.get("converged"),
        "failed": _failed_runs(runs),
        "references": _reference_sections(tables),
        "caveats": [md_text(c) for c in reference.CAVEATS],
        "confidence": int(CONFIDENCE * 100),
        "alpha": ALPHA,
        "resamples": BOOTSTRAP_RESAMPLES,
        "power": TARGET_POWER,
    }
    # Figures of the trust section (and the item-level rank figure) are embedded like the families' own.
    ranks_figure = []
    if context["item_ranks"] and context["item_ranks_figure"]:
        ranks_figure = [{"figure": context["item_ranks_figure"],
                         "figure_path": Path(figures_dir) / f"{figures.ITEM_RANKS_FIGURE}.png"}]
    return (_environment().get_template("report.md.j2").render(**context),
            families + (trust or {}).get("families", []) + ranks_figure)


def _embed_figures(body: str, families: list[dict]) -> str:
    """Swap each figure's relative path for a base64 data URI so the HTML needs no other file."""
    for family in families:
        if family["figure"]:
            encoded = base64.b64encode(Path(family["figure_path"]).read_bytes()).decode("ascii")
            body = body.replace(f'src="{family["figure"]}"', f'src="data:image/png;base64,{encoded}"')
    return body


# How close a short study's difference must come to the converged one to hold: 2 points, or inside its CI.
HOLDS_WITHIN = 0.02


def converged_rows(tests: pd.DataFrame, reference_tests: pd.DataFrame, family: str) -> list[dict]:
    """This study's test-accuracy differences against the family's baseline beside the converged reference's.

    A difference *holds* when it lies within ``HOLDS_WITHIN`` (2 points) of the converged one or inside the
    converged difference's 95 % CI: then the short study gives the answer that training to convergence gives.
    """
    def primary(frame: pd.DataFrame) -> pd.DataFrame:
        keep = (frame["family"] == family) & (frame["metric"] == PRIMARY_METRIC) & (frame["split"] == PRIMARY_SPLIT)
        return frame[keep].set_index("variant")

    ours, converged = primary(tests), primary(reference_tests)
    rows = []
    for variant, test in ours.iterrows():
        row = {"variant": md_text(variant), "baseline": md_text(test["baseline"]),
               "ours": _points_ci(test["diff"], test["diff_ci_low"], test["diff_ci_high"]),
               "n": f"{int(test['n_pairs'] or test['n_variant'])}", "reference": "not in the reference",
               "gap": "–", "holds": "–"}
        if variant in converged.index and converged.loc[variant, "baseline"] == test["baseline"]:
            ref = converged.loc[variant]
            gap = test["diff"] - ref["diff"]
            inside = ref["diff_ci_low"] <= test["diff"] <= ref["diff_ci_high"]
            holds = abs(gap) <= HOLDS_WITHIN or bool(inside)
            row.update(reference=_points_ci(ref["diff"], ref["diff_ci_low"], ref["diff_ci_high"]),
                       n_reference=f"{int(ref['n_pairs'] or ref['n_variant'])}", gap=fmt_points(gap),
                       holds="yes" if holds else "**no**")
        rows.append(row)
    return rows


def _converged_section(tables: dict, reference: dict | None) -> dict | None:
    if not reference:
        return None
    path = Path(reference["tables"]) / "tests.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the study names a converged reference (converged_reference) "
                                "whose tables are not there; run its config (make reference) or remove the key")
    rows = converged_rows(tables["tests"], pd.read_parquet(path), reference["family"])
    return {"family": md_text(reference["family"]), "tables": md_text(reference["tables"]), "rows": rows}


def build_report(
    tables_dir: str | Path, figures_dir: str | Path, out_dir: str | Path, meta: dict | None = None,
    reference: dict | None = None,
) -> dict[str, Path]:
    """Write ``<out_dir>/report.md`` and a self-contained ``<out_dir>/report.html``; returns both paths.

    ``tables_dir`` holds runs, metrics, tests, summary and seed_consistency (``.parquet``);
    ``figures_dir`` the PNGs from ``lora_bench.report.figures.make_all_figures``. ``meta`` adds lines to the
    setup table (e.g. ``{"config": "config/default.yaml"}``) and may set ``title``.
    """
    tables_dir, figures_dir, out_dir = Path(tables_dir), Path(figures_dir), Path(out_dir)
    tables = _read_tables(tables_dir)
    tables["converged"] = _converged_section(tables, reference)
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
    write_text(text, paths["markdown"])
    write_text(page, paths["html"])
    return paths


def snakemake_report_caption(kind: str) -> str:
    """reStructuredText caption for a family kind's figure, for Snakemake's ``report(..., caption=...)``."""
    caption = figures.figure_caption(kind)
    escaped = re.sub(r"([*`|_\\])", r"\\\1", caption)
    details = (
        "Diamonds or lines are means over seeds; error bars and bands are 95 % bootstrap confidence "
        "intervals (none where a condition has a single run); small dots are single seeds. Failed runs are "
        "left out."
    )
    return f"**{kind.replace('_', ' ')}** — {escaped}\n\n{details}\n"
