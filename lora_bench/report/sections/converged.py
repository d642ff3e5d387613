"""This study against the converged reference: does a short study's verdict hold when training converges?"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lora_bench.analysis.columns import cfg
from lora_bench.report.formatting import fmt_points, md_text, points_ci
from lora_bench.report.sections.common import PRIMARY_METRIC, PRIMARY_SPLIT

# How close a short study's difference must come to the converged one to hold: 2 points, or inside its CI.
HOLDS_WITHIN = 0.02


def converged_rows(tests: pd.DataFrame, reference_tests: pd.DataFrame, family: str) -> list[dict]:
    """This study's test-accuracy differences against the family's baseline beside the converged reference's.

    A difference *holds* when it lies within ``HOLDS_WITHIN`` (2 points) of the converged one or inside the
    converged difference's 95 % CI: then the short study gives the answer that training to convergence gives.
    One that holds only by the CI says how far its size is off. Variants only the reference ran follow, so the
    reader sees what else convergence answered (e.g. another LoRA init).
    """
    def primary(frame: pd.DataFrame) -> pd.DataFrame:
        keep = (frame["family"] == family) & (frame["metric"] == PRIMARY_METRIC) & (frame["split"] == PRIMARY_SPLIT)
        return frame[keep].set_index("variant")

    def diff_ci(test: pd.Series) -> str:
        return points_ci(test["diff"], test["diff_ci_low"], test["diff_ci_high"])

    ours, converged = primary(tests), primary(reference_tests)
    rows = []
    for variant, test in ours.iterrows():
        row = {"variant": md_text(variant), "baseline": md_text(test["baseline"]), "ours": diff_ci(test),
               "n": f"{int(test['n_pairs'] or test['n_variant'])}", "reference": "not in the reference",
               "gap": "–", "holds": "–"}
        if variant in converged.index and converged.loc[variant, "baseline"] == test["baseline"]:
            ref = converged.loc[variant]
            gap = test["diff"] - ref["diff"]
            inside = ref["diff_ci_low"] <= test["diff"] <= ref["diff_ci_high"]
            holds = abs(gap) <= HOLDS_WITHIN or bool(inside)
            row.update(reference=diff_ci(ref),
                       n_reference=f"{int(ref['n_pairs'] or ref['n_variant'])}", gap=fmt_points(gap),
                       holds=_holds_text(holds, gap))
        rows.append(row)
    for variant, ref in converged.iterrows():
        if variant not in ours.index:
            rows.append({"variant": md_text(variant), "baseline": md_text(ref["baseline"]), "ours": "not in this study",
                         "n": "–", "reference": diff_ci(ref), "gap": "–", "holds": "–"})
    return rows


def _holds_text(holds: bool, gap: float) -> str:
    """'yes' / '**no**'; a difference that holds only by lying inside a wide converged CI says how far off it is."""
    if not holds:
        return "**no**"
    if abs(gap) > HOLDS_WITHIN:
        return f"yes, inside the converged CI (size off by {fmt_points(gap, 1)} points)"
    return "yes"


def reference_setting(runs: pd.DataFrame, family: str) -> str:
    """How the reference's runs of ``family`` trained, read from its runs table (epochs, training examples, batch,
    and which setting a tuning family chose on validation)."""
    tuned = sorted({key for key in runs.loc[runs["tunes"] == family, "tune_key"].dropna()}) if {
        "tunes", "tune_key"} <= set(runs) else []
    runs = runs[runs["family"] == family] if "family" in runs else runs.iloc[0:0]

    def values(column: str, unit: str) -> str | None:
        if column not in runs or runs[column].dropna().empty:
            return None
        found = sorted({int(v) for v in runs[column].dropna()})
        return f"{' / '.join(f'{v:,}' for v in found)} {unit}"

    parts = [values(cfg("train.epochs"), "epochs"), values("data.size.train", "training examples"),
             values(cfg("train.batch_size"), "per batch")]
    parts += [f"{key} tuned on validation" for key in tuned]
    return ", ".join(part for part in parts if part) or "setting not recorded"


def converged_section(tables: dict, reference: dict | None) -> dict | None:
    if not reference:
        return None
    path = Path(reference["tables"]) / "tests.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the study names a converged reference (converged_reference) "
                                "whose tables are not there; run its config (make reference) or remove the key")
    rows = converged_rows(tables["tests"], pd.read_parquet(path), reference["family"])
    runs_path = path.with_name("runs.parquet")
    setting = reference_setting(pd.read_parquet(runs_path), reference["family"]) if runs_path.exists() else \
        "setting not recorded"
    return {"family": md_text(reference["family"]), "tables": md_text(reference["tables"]),
            "setting": md_text(setting), "rows": rows}
