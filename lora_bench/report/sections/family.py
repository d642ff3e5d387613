"""Every family's section of the report: its figure, its kind's parts, the claims, the runs that did not train and
the cost changes.

A kind's parts come from ``KIND_SECTIONS``: each ``SectionPart`` is a builder (family, tables -> the part's
context, or None to leave it out) and its template partial under ``templates/``, rendered in order between the
figure and the claims. Adding a family kind is one entry here (the generic accuracy table will do) beside its
``KindSpec`` in ``lora_bench.study.KINDS`` and its figure in ``lora_bench.report.figures.FIGURES``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from lora_bench.analysis.compare import baseline_variant
from lora_bench.analysis.cost import MEMORY_TIME_MEMORY_METRICS, MEMORY_TIME_TIME_METRIC
from lora_bench.analysis.summary import family_order
from lora_bench.report import figures
from lora_bench.report.formatting import finite, fmt_interval, fmt_p, fmt_relative, fmt_value, md_text
from lora_bench.report.sections import conditions, epochs, instruct, lora_variants, memory_time, tune
from lora_bench.report.sections.common import PRIMARY_METRIC, PRIMARY_SPLIT, SectionPart, relative_url, show_accuracy
from lora_bench.report.sections.findings import family_claims, rank_note
from lora_bench.study import kind_spec

GENERIC_PARTS: tuple[SectionPart, ...] = (conditions.PART,)
# Family kind -> the parts of its section, in order. Variance and sweep families have none: they are reported under
# "How much to trust a single run" (``KindSpec.trust``, lora_bench.report.sections.trust).
KIND_SECTIONS: dict[str, tuple[SectionPart, ...]] = {
    "methods": GENERIC_PARTS,
    "rank_alpha": GENERIC_PARTS,
    "coverage": GENERIC_PARTS,
    "epochs": (epochs.PART,),
    "optimizer": GENERIC_PARTS,
    "memory_time": (memory_time.PART, conditions.PART),
    "variance": (),
    "sweep": (),
    "instruct": (instruct.PART, conditions.PART),
    "lora_variants": (lora_variants.PART, conditions.PART),
    "generic": GENERIC_PARTS,
    "tune": (tune.PART,),
}


def section_parts(kind: str) -> tuple[SectionPart, ...]:
    """The parts of a kind's section; a kind without an entry gets the generic accuracy table."""
    return KIND_SECTIONS.get(kind, GENERIC_PARTS)


COST_METRICS = ("wall_time", "median_step_time", "examples_per_second", "peak_rss", "peak_cuda_allocated")


def _cost_rows(family: str, tests: pd.DataFrame, shown: tuple[str, ...] = ()) -> list[dict]:
    """Relative cost changes vs the baseline, leaving out the metrics in ``shown`` (already reported)."""
    rows = []
    costs = tests[(tests["family"] == family) & tests["metric"].isin(COST_METRICS) & ~tests["metric"].isin(shown)]
    costs = costs[costs["mean_variant"].notna() & costs["mean_baseline"].notna()]
    for t in costs.itertuples():
        relative = t.diff / t.mean_baseline if finite(t.mean_baseline) and t.mean_baseline else math.nan
        low = t.diff_ci_low / t.mean_baseline if finite(relative) else math.nan
        high = t.diff_ci_high / t.mean_baseline if finite(relative) else math.nan
        rows.append(
            {
                "variant": md_text(t.variant),
                "metric": md_text(t.metric.replace("_", " ")),
                "mean": fmt_value(t.mean_variant, t.unit),
                "baseline": fmt_value(t.mean_baseline, t.unit),
                "change": f"{fmt_relative(relative)} {fmt_interval(low, high, fmt_relative)}",
                "p": fmt_p(t.p_holm),
                "verdict": t.verdict if finite(t.p_value) else "not tested",
            }
        )
    return rows


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
                     "p": fmt_p(run.learned_p) if finite(getattr(run, "learned_p", None)) else "–"})
    return rows


def family_sections(tables: dict, figures_dir: Path, out_dir: Path) -> list[dict]:
    """One section per family in config order, except those of kinds reported under the trust section."""
    runs = tables["runs"]
    return [_family_section(family, tables, figures_dir, out_dir) for family in family_order(runs)
            if not kind_spec(str(runs.loc[runs["family"] == family, "family_kind"].iloc[0])).trust]


def _family_section(family: str, tables: dict, figures_dir: Path, out_dir: Path) -> dict:
    runs, tests = tables["runs"], tables["tests"]
    kind = str(runs.loc[runs["family"] == family, "family_kind"].iloc[0])
    spec = kind_spec(kind)
    png = figures_dir / f"{figures.figure_stem(family)}.png"
    primary_tests = tests[(tests["family"] == family) & (tests["metric"] == PRIMARY_METRIC)
                          & (tests["split"] == PRIMARY_SPLIT)]
    parts = [(part, part.build(family, tables)) for part in section_parts(kind)]
    # A kind with its own cost table leaves the metrics that table shows out of the generic one.
    shown = () if spec.cost_metrics is None else (MEMORY_TIME_TIME_METRIC, *MEMORY_TIME_MEMORY_METRICS,
                                                   *spec.cost_metrics)
    return {
        "name": md_text(family),
        "anchor": family,
        "kind": kind,
        "caption": md_text(figures.figure_caption(kind)),
        "figure": relative_url(png, out_dir) if png.exists() else None,
        "figure_path": png,
        "show_accuracy": show_accuracy(family, tables),
        "parts": [{"template": part.template, "data": data} for part, data in parts if data],
        "cost_claims": [claim for part, data in parts if data and part.cost_headline for claim in data["claims"]],
        "claims": family_claims(tables, family, primary_tests),
        "learning": _learning_rows(runs, family),
        "rank_note": rank_note(primary_tests[primary_tests["p_value"].notna()]),
        "cost_rows": _cost_rows(family, tests, shown) if spec.cost_table else [],
        "other_costs": bool(shown),
        "baseline": md_text(baseline_variant(runs, family)[0] or "none"),
    }
