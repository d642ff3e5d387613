"""The sentences that state a family's results: one per comparison of test accuracy with its interval, test,
Holm-adjusted p-value and seeds (the item-level test first where runs kept predictions), and the caveat on rank
tests too weak to confirm them."""

from __future__ import annotations

import pandas as pd

from lora_bench.analysis.summary import ALPHA, TARGET_POWER
from lora_bench.analysis.tuning import flags
from lora_bench.report.formatting import (
    finite,
    fmt_p,
    fmt_percent,
    fmt_points,
    fmt_signed,
    fmt_size,
    md_text,
    p_phrase,
)
from lora_bench.report.sections.common import PRIMARY_SPLIT, tie_decision


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
    if not finite(test["p_value"]):
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
    if finite(test["effect_size"]):
        evidence.append(f"{test['effect_size_kind']} = {fmt_signed(test['effect_size'])}")
    evidence.append(n)
    evidence_text = "; ".join(evidence)
    if test["verdict"] == "better":
        sentence = f"{variant} beats {baseline}: {number(test['diff'])}{unit_word} ({evidence_text})."
    elif test["verdict"] == "worse":
        sentence = f"{variant} is worse than {baseline}: {number(test['diff'])}{unit_word} ({evidence_text})."
    else:
        evidence_text += detectable_phrase(test.get("detectable_diff"), accuracy, unit_word)
        sentence = (
            f"No significant difference between {variant} and {baseline}: "
            f"{number(test['diff'])}{unit_word} ({evidence_text})."
        )
    rank_p = test["p_nonparametric_holm"]
    if test["verdict"] != "n.s." and finite(rank_p) and not _rank_test_powerless(test):
        agrees = float(rank_p) < ALPHA
        sentence += f" The rank test ({test['nonparametric_test']}, Holm {p_phrase(rank_p)}) " + (
            "agrees." if agrees else "does not confirm it."
        )
    if test["note"]:
        sentence += f" Note: {md_text(test['note'])}."
    return sentence


def detectable_phrase(detectable, accuracy: bool, unit_word: str = " points") -> str:
    """'; it finds 3.3 points or more with 80% power': what a non-significant test rules out (empty if unknown)."""
    if not finite(detectable):
        return ""
    return f"; it finds {fmt_size(detectable, accuracy)}{unit_word} or more with {TARGET_POWER:.0%} power"


def _rank_test_powerless(test: pd.Series) -> bool:
    """Whether the exact Wilcoxon test could not reach p < alpha with this many pairs, whatever the data."""
    return bool(test["paired"]) and 2.0 ** (1 - int(test["n_pairs"])) >= ALPHA


def rank_note(family_tests: pd.DataFrame) -> str:
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


def _item_test(tables: dict, family: str, variant: str):
    """The item-level test of a variant vs its baseline on test accuracy, or None when there is none."""
    tests = tables.get("item_tests")
    if tests is None or tests.empty:
        return None
    rows = tests[(tests["family"] == family) & (tests["variant"] == variant) & (tests["split"] == PRIMARY_SPLIT)]
    return rows.iloc[0] if len(rows) and finite(rows.iloc[0]["p_value"]) else None


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
        evidence += detectable_phrase(item.get("detectable_diff"), accuracy=True)
        sentence = (f"No significant difference between {variant} and {baseline}: {fmt_points(item['diff'])} points "
                    f"({evidence}).")
    if finite(test["p_value"]):
        sentence += (f" Seed-level {test['test']}: {fmt_points(test['diff'])} points, Holm {p_phrase(test['p_holm'])}"
                     f" (n = {int(test['n_pairs']) if test['paired'] else int(test['n_variant'])} seeds).")
    if item["note"]:
        sentence += f" Note: {md_text(item['note'])}."
    return sentence


def _tuning_caveat(tables: dict, family: str, test: pd.Series) -> str:
    """A sentence for each side of a comparison whose tuned value is an end of its grid (else empty)."""
    tuning = tables.get("tuning")
    if tuning is None or tuning.empty or "chosen_edge" not in tuning:
        return ""
    family_rows = tuning[tuning["family"] == family]
    caveats = []
    for side in (test["variant"], test["baseline"]):
        grid = family_rows[family_rows["setting"] == side].sort_values("value")
        chosen = grid[grid["chosen"].astype(bool)]
        tie = _tie_caveat(side, grid, chosen)
        if tie:
            caveats.append(tie)
        untrained = _untrained_caveat(side, chosen)
        if untrained:
            caveats.append(untrained)
        edge = chosen["chosen_edge"].iloc[0] if len(chosen) else ""
        if edge not in ("low", "high"):
            continue
        row, neighbour = chosen.iloc[0], grid.iloc[1] if edge == "low" else grid.iloc[-2]
        scores = (f"validation {fmt_percent(row['mean'])} % vs {fmt_percent(neighbour['mean'])} % at "
                  f"{neighbour['value']:g}")
        extended = int(flags(grid, "extension").sum())
        widened = f" (widened by {extended} step(s) of tune.extend)" if extended else ""
        caveats.append(f"{md_text(side)}'s tuned {md_text(row['key'])} ({row['value']:g}, {scores}) is the "
                       f"{'smallest' if edge == 'low' else 'largest'} value of its grid{widened}, so its best value "
                       f"may lie {'below' if edge == 'low' else 'above'} it")
    return f" Tuning caveat: {'; '.join(caveats)}." if caveats else ""


def _untrained_caveat(side: str, chosen: pd.DataFrame) -> str:
    """Where the chosen value's own tuning runs had not all trained (learned and levelled off): the choice was
    made on runs still moving at the end of the budget, so a longer budget could choose another value."""
    if chosen.empty or "trained" not in chosen:
        return ""
    row = chosen.iloc[0]
    fraction = row["trained"]
    if not finite(fraction) or fraction >= 1:
        return ""
    share = "none" if fraction == 0 else f"{fmt_percent(fraction, 0)} %"
    return (f"{md_text(side)}'s tuned {md_text(row['key'])} ({row['value']:g}) was chosen on tuning runs of which "
            f"{share} trained (learned and levelled off), so a longer tuning budget might choose another value")


def _tie_caveat(side: str, grid: pd.DataFrame, chosen: pd.DataFrame) -> str:
    """Where the chosen value tied others on the validation score: which, and what decided."""
    if chosen.empty:
        return ""
    row = chosen.iloc[0]
    decision = tie_decision(grid, side, float(row["value"]))
    if not decision:
        return ""
    return (f"{md_text(side)}'s tuned {md_text(row['key'])} ({row['value']:g}, validation "
            f"{fmt_percent(row['mean'])} %) {decision}")


def family_claims(tables: dict, family: str, primary_tests: pd.DataFrame) -> list[dict]:
    """Claims of a family: the item-level test where predictions exist, else the seed-level one; each with the
    caveat of a tuned value at the end of its grid."""
    claims = []
    for _, t in primary_tests.iterrows():
        item = _item_test(tables, family, t["variant"])
        caveat = _tuning_caveat(tables, family, t)
        if item is None:
            claims.append({"text": _claim(t) + caveat, "verdict": t["verdict"],
                           "convergence": t.get("convergence", "unknown")})
        else:
            claims.append({"text": _convergence_prefix(t) + _item_claim(t, item) + caveat, "verdict": item["verdict"],
                           "convergence": t.get("convergence", "unknown")})
    return claims
