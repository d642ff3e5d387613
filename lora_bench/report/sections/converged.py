"""This study against the converged reference: does a short study's verdict hold when training converges?"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lora_bench.report.formatting import fmt_points, md_text, points_ci
from lora_bench.report.sections.common import PRIMARY_METRIC, PRIMARY_SPLIT

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
               "ours": points_ci(test["diff"], test["diff_ci_low"], test["diff_ci_high"]),
               "n": f"{int(test['n_pairs'] or test['n_variant'])}", "reference": "not in the reference",
               "gap": "–", "holds": "–"}
        if variant in converged.index and converged.loc[variant, "baseline"] == test["baseline"]:
            ref = converged.loc[variant]
            gap = test["diff"] - ref["diff"]
            inside = ref["diff_ci_low"] <= test["diff"] <= ref["diff_ci_high"]
            holds = abs(gap) <= HOLDS_WITHIN or bool(inside)
            row.update(reference=points_ci(ref["diff"], ref["diff_ci_low"], ref["diff_ci_high"]),
                       n_reference=f"{int(ref['n_pairs'] or ref['n_variant'])}", gap=fmt_points(gap),
                       holds="yes" if holds else "**no**")
        rows.append(row)
    return rows


def converged_section(tables: dict, reference: dict | None) -> dict | None:
    if not reference:
        return None
    path = Path(reference["tables"]) / "tests.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the study names a converged reference (converged_reference) "
                                "whose tables are not there; run its config (make reference) or remove the key")
    rows = converged_rows(tables["tests"], pd.read_parquet(path), reference["family"])
    return {"family": md_text(reference["family"]), "tables": md_text(reference["tables"]), "rows": rows}
