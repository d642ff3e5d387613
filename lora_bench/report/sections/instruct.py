"""The section part of an instruct family: zero-shot against finetuned accuracy and perplexity, per-epoch accuracy,
and the claims of reference B tested here (lora_bench.analysis.claims)."""

from __future__ import annotations

import pandas as pd

from lora_bench.analysis.claims import INSTRUCT_CLAIMS, epoch_curve_variants
from lora_bench.report import figures
from lora_bench.report.formatting import (
    finite,
    fmt_interval,
    fmt_p,
    fmt_percent,
    fmt_points,
    fmt_signed,
    fmt_size,
    md_text,
)
from lora_bench.report.sections.common import SectionPart


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


def _difference(diff, low, high, number) -> str:
    """'+5.56 [−15.72, +26.84]'; a difference equal in every seed pair has no interval to show."""
    if not finite(diff):
        return "–"
    if low == high == diff:
        return f"{number(diff)} (equal in every pair)"
    return f"{number(diff)} {fmt_interval(low, high, number)}"


def _verdict(claim) -> str:
    """The claim's verdict; on runs that did not converge, 'inconclusive' with what the test alone said."""
    if not finite(claim.verdict_p_holm):
        return f"not tested: {md_text(claim.note) or 'no p-value'}"
    if claim.support == "inconclusive":
        counts = [f"{int(n)} run(s) of {md_text(name)}" for n, name in
                  dict.fromkeys([(claim.untrained_better, claim.better.split("@")[0]),
                                 (claim.untrained_worse, claim.worse.split("@")[0])]) if n]
        return (f"**inconclusive**: training did not converge ({' and '.join(counts)}); the test alone: "
                f"{SUPPORT_WORDS.get(claim.test_support, claim.test_support)}")
    return SUPPORT_WORDS.get(claim.support, claim.support)


def instruct_section(family: str, tables: dict) -> dict:
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
    # Only variants tested after every epoch: the others' one test value sits at whichever epoch each seed's
    # validation picked, which would read as a (misleading) curve with n = 1 or 2 per epoch.
    curves = set(epoch_curve_variants(runs, family))
    multi = [v for v in figures.variant_order(runs, family) if v in curves and len(per_epoch)
             and (per_epoch[per_epoch["variant"] == v]["epoch"].astype(int) >= 2).any()]
    for variant in multi:
        part = per_epoch[per_epoch["variant"] == variant].sort_values("epoch")
        for s in part.itertuples():
            epoch_rows.append({"variant": md_text(variant),
                               "epoch": "0 (zero-shot)" if int(s.epoch) == 0 else str(int(s.epoch)),
                               "n": str(int(s.n)), "accuracy": fmt_percent(s.mean),
                               "ci": fmt_interval(s.ci_low, s.ci_high, fmt_percent)})
    claims = []
    for c in tables["claims"].query("family == @family").itertuples():
        accuracy = c.metric in ("accuracy", "lm_eval")
        number = fmt_points if accuracy else (lambda x: fmt_signed(x, 3))
        by_items = finite(c.item_p_value)
        seed_n = f"{int(c.n_pairs)} pairs" if c.paired else (f"{int(c.n_pairs)} common seeds" if c.n_pairs else "–")
        diff, low, high = (c.item_diff, c.item_diff_ci_low, c.item_diff_ci_high) if by_items \
            else (c.diff, c.diff_ci_low, c.diff_ci_high)
        seed_level = (f"{number(c.diff)}, p (Holm) {fmt_p(c.p_holm)}" if finite(c.p_value) and by_items else "")
        claims.append({"statement": md_text(c.statement), "comparison": md_text(c.comparison),
                       "metric": (f"test {c.metric}" if c.metric != "lm_eval" else "LM harness mean")
                       + (" (points)" if accuracy else " (nats)"),
                       "n": md_text(c.item_design) if by_items else seed_n,
                       "test": "items x seeds" if by_items else md_text(c.test),
                       "diff": _difference(diff, low, high, number),
                       "detectable": fmt_size(c.item_detectable_diff if by_items else c.detectable_diff, accuracy),
                       "p": fmt_p(c.verdict_p_holm), "seed_level": seed_level or "–",
                       "verdict": _verdict(c)})
    tested = {c["statement"] for c in claims}
    missing = [md_text(text) for _, text in INSTRUCT_CLAIMS if md_text(text) not in tested]
    return {"rows": rows, "epoch_rows": epoch_rows, "claims": claims, "untested": missing}


PART = SectionPart("instruct.md.j2", instruct_section)
