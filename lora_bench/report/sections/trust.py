"""How much to trust a single run: the variance and sweep families (``KindSpec.trust``; lora_bench.analysis.variance),
with where the variance of accuracy comes from and what picking the best of a single-run sweep is worth."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lora_bench.analysis import variance
from lora_bench.analysis.summary import family_order
from lora_bench.report import figures
from lora_bench.report.formatting import finite, fmt_percent, md_text, p_phrase, pct_ci, points_ci
from lora_bench.report.sections.common import relative_url
from lora_bench.study import SWEEP_KIND, kinds_where

# Kinds reported here instead of in a family section of their own.
TRUST_KINDS = kinds_where(lambda spec: spec.trust)
TRUST_TABLES = {
    "variance_components": variance.VARIANCE_COLUMNS,
    "sweep_reeval": variance.REEVAL_COLUMNS,
    "sweep_summary": variance.SUMMARY_COLUMNS,
}


def read_trust_tables(tables_dir: Path, tables: dict) -> None:
    """Add the variance and sweep tables to ``tables``: required when the study has such a family, else empty."""
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


def _variance_rows(components: pd.DataFrame) -> list[dict]:
    rows = []
    for c in components.itertuples():
        rows.append({
            "family": md_text(c.family),
            "setting": md_text(c.setting),
            "design": f"{int(c.n_data_seeds)} × {int(c.n_train_seeds)} ({int(c.n_runs)} runs)",
            "mean": fmt_percent(c.mean),
            "sd_data": pct_ci(c.sd_data, c.sd_data_ci_low, c.sd_data_ci_high),
            "sd_train": pct_ci(c.sd_train, c.sd_train_ci_low, c.sd_train_ci_high),
            "sd_residual": pct_ci(c.sd_residual, c.sd_residual_ci_low, c.sd_residual_ci_high),
            "share_data": pct_ci(c.share_data, c.share_data_ci_low, c.share_data_ci_high, 0),
            "share_train": pct_ci(c.share_train, c.share_train_ci_low, c.share_train_ci_high, 0),
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
    if not finite(val.winner_rerun_mean):
        out.append("The winner has no finished re-runs, so its optimism cannot be measured.")
        return out
    per = int(val.n_reruns / max(1, val.top_k))
    rerun_val = pct_ci(val.winner_rerun_mean, val.winner_rerun_ci_low, val.winner_rerun_ci_high)
    text = (f"Re-run about {per} times on fresh train and data seeds it averages {rerun_val} % on validation: "
            f"the **optimism** of the single-run pick is "
            f"{points_ci(val.optimism, val.optimism_ci_low, val.optimism_ci_high)} points")
    if test is not None and finite(test.optimism):
        rerun_test = pct_ci(test.winner_rerun_mean, test.winner_rerun_ci_low, test.winner_rerun_ci_high)
        text += (f" on validation and {points_ci(test.optimism, test.optimism_ci_low, test.optimism_ci_high)} "
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
        f"{points_ci(val.topk_optimism, val.topk_optimism_ci_low, val.topk_optimism_ci_high)} points"
        + (f" (slope of re-run mean on sweep score {val.slope:.2f})" if finite(val.slope) else "")
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
            "rerun_val": pct_ci(r.rerun_mean, r.rerun_ci_low, r.rerun_ci_high),
            "optimism_val": points_ci(r.optimism, r.optimism_ci_low, r.optimism_ci_high),
            "sweep_test": fmt_percent(t.sweep_score) if t is not None else "–",
            "rerun_test": pct_ci(t.rerun_mean, t.rerun_ci_low, t.rerun_ci_high) if t is not None else "–",
            "p_best": fmt_percent(r.p_best, 0),
        })
    return rows


def trust_section(tables: dict, figures_dir: Path, out_dir: Path) -> dict | None:
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
            "figure": relative_url(png, out_dir) if png.exists() else None,
            "figure_path": png,
            "sentences": _sweep_sentences(tables["sweep_summary"], family) if kind == SWEEP_KIND else [],
            "rows": _sweep_rows(tables["sweep_reeval"], family) if kind == SWEEP_KIND else [],
        })
    return {
        "families": entries,
        "variance_rows": _variance_rows(tables["variance_components"]),
        "resamples": variance.VC_RESAMPLES,
    }
