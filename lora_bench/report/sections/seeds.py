"""How consistent seeds are: each condition's spread and the seeds a study would need to detect one point."""

from __future__ import annotations

import math

import pandas as pd

from lora_bench.report.formatting import fmt_count, fmt_seeds, fmt_value, md_text


def seed_rows(seed_consistency: pd.DataFrame) -> list[dict]:
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
                "seeds_items": fmt_seeds(getattr(s, "seeds_for_1pt_items", math.nan)),
            }
        )
    return rows
