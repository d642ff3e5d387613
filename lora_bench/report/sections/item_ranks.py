"""Rank uncertainty at the item level: the probability that each variant is best (lora_bench.analysis.items)."""

from __future__ import annotations

import pandas as pd

from lora_bench.report.formatting import fmt_percent, md_text


def item_rank_rows(ranks: pd.DataFrame) -> list[dict]:
    rows = []
    for r in ranks.drop_duplicates(["family", "split", "variant"]).itertuples():
        rows.append({"family": md_text(r.family), "variant": md_text(r.variant) + (" (baseline)" if r.is_baseline
                                                                                   else ""),
                     "mean": fmt_percent(r.mean), "p_rank1": f"{r.p_rank1:.2f}", "mean_rank": f"{r.mean_rank:.1f}",
                     "tie_group": r.tie_group, "n": f"{int(r.n_seeds)} seeds x {int(r.n_items)} items"})
    return rows
