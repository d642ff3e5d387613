"""The section part of a tune family: the values tried, their validation scores and the one chosen."""

from __future__ import annotations

from lora_bench.analysis.tuning import flags, tie_break_of, tie_break_spec, tie_margin_of
from lora_bench.report.formatting import finite, fmt_percent, md_text
from lora_bench.report.sections.common import SectionPart, tie_decision


def tune_section(family: str, tables: dict) -> dict | None:
    """A tuning family's chosen values, scores per value and budget (lora_bench.analysis.tuning)."""
    table = tables.get("tuning")
    if table is None or table.empty:
        return None
    part = table[table["tuning_family"] == family]
    if part.empty:
        return None
    # Each variant's values in ascending order (extensions were appended after the base grid), variants as run.
    order = {setting: i for i, setting in enumerate(part["setting"].unique())}
    part = part.assign(_order=part["setting"].map(order)).sort_values(["_order", "value"], kind="stable")
    runs = tables["runs"]
    family_runs = runs[runs["family"] == family]
    extension = flags(part, "extension")
    rule = tie_break_of(part["tie_break"].iloc[0] if "tie_break" in part else None)
    rows = [{"setting": md_text(r.setting), "value": f"{r.value:g}{' (extension)' if beyond else ''}",
             "n": int(r.n_runs - r.n_failed), "score": _score_cell(r),
             "loss": f"{r.loss:.4f}" if finite(getattr(r, "loss", None)) else "–",
             "trained": _trained_cell(getattr(r, "trained", None)),
             "chosen": _chosen_mark(r, part)}
            for r, beyond in zip(part.itertuples(), extension)]
    epochs = part["epochs"].iloc[0]
    base = part[~extension]
    on_tie_seeds = flags(family_runs, "tune_tie_seed")
    n_variants, seeds = base["setting"].nunique(), int(family_runs.loc[~on_tie_seeds, "seed"].nunique())
    extended = part[extension]
    beyond = (f", plus {len(extended)} value(s) beyond a grid's end where the value chosen sat there (tune.extend: "
              + ", ".join(f"{md_text(r.setting)} {r.value:g}" for r in extended.itertuples()) + ")"
              if len(extended) else "")
    if on_tie_seeds.any():
        tie_runs = family_runs[on_tie_seeds]
        beyond += (f", plus {len(tie_runs)} run(s) of the values tied at the top on "
                   f"{tie_runs['seed'].nunique()} tie seed(s) (tune.tie_seeds)")
    budget = (f"{len(base) // max(1, n_variants)} values x {n_variants} variants x {seeds} tuning seed(s){beyond}"
              f" = {len(family_runs)} runs{f' of {int(epochs)} epoch(s)' if finite(epochs) else ''}, the same budget "
              "per run for every variant; validation split only (the test split was not evaluated)")
    return {"tuned": md_text(part["family"].iloc[0]), "key": md_text(part["key"].iloc[0]),
            "metric": md_text(part["metric"].iloc[0]), "rows": rows, "budget": budget,
            "tie_break": tie_break_spec(rule).description,
            "within": _within(part),
            "tie_seeds": "the best mean over the tuning and tie seeds, then " if on_tie_seeds.any() else ""}


def _within(part) -> str:
    """" (within 0.25 points of the best)" where tune.tie_margin widened what ties; empty for exact ties only."""
    margin = tie_margin_of(part["tie_margin"].iloc[0] if "tie_margin" in part else None)
    return f" (within {fmt_percent(margin)} points of the best)" if margin else ""


def _trained_cell(fraction) -> str:
    """Whether the value's finished tuning runs trained (learned and levelled off); "–" where not known."""
    if not finite(fraction):
        return "–"
    return {1.0: "yes", 0.0: "no"}.get(float(fraction), f"partly ({fmt_percent(fraction, 0)} %)")


def _score_cell(row) -> str:
    """The mean on the tuning seeds, and for a value that ran on the tie seeds its mean over both."""
    score = fmt_percent(row.mean)
    if finite(getattr(row, "tie_mean", None)):
        score += f" ({fmt_percent(row.tie_mean)} with its {int(row.n_tie_runs)} tie-seed run(s))"
    return score


def _chosen_mark(row, part) -> str:
    """"chosen"; which values it tied with, where a tie-break decided; and, where the chosen value is an end of the
    grid, that the best value may lie beyond it."""
    if not row.chosen:
        return ""
    decision = tie_decision(part, row.setting, row.value)
    notes = [decision] if decision else []
    edge = getattr(row, "chosen_edge", "") or ""
    beyond = {"low": "the smallest value tried: the best may be lower",
              "high": "the largest value tried: the best may be higher"}.get(edge)
    if beyond:
        notes.append(beyond)
    return f"**chosen** ({'; '.join(notes)})" if notes else "**chosen**"


PART = SectionPart("tune.md.j2", tune_section)
