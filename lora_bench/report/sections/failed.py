"""The failed runs, each with the start of its error."""

from __future__ import annotations

import pandas as pd

from lora_bench.report.formatting import md_text

ERROR_CHARS = 400


def failed_runs(runs: pd.DataFrame) -> list[dict]:
    failed = runs[runs["status"] != "ok"]
    out = []
    for row in failed.itertuples():
        error = str(getattr(row, "error", "") or "no error message recorded")
        if len(error) > ERROR_CHARS:
            error = error[:ERROR_CHARS] + " …"
        out.append({"run_id": str(row.run_id).replace("`", "'"), "error": md_text(error)})
    return out
