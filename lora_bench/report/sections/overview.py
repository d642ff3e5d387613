"""The report's opening: what was run (overview), the main findings and their caveats (headline), and the setup
table."""

from __future__ import annotations

import pandas as pd

from lora_bench.analysis.columns import cfg
from lora_bench.analysis.summary import family_order
from lora_bench.report.formatting import md_text
from lora_bench.report.sections.common import PRIMARY_METRIC, PRIMARY_SPLIT, data_description, seed_text, unique_text
from lora_bench.study import kind_spec


def overview(runs: pd.DataFrame, meta: dict) -> dict:
    ok = runs["status"] == "ok"
    seeds = sorted({int(s) for s in runs["seed"].dropna()})
    per_condition = runs.groupby(["family", "variant"])["seed"].nunique()
    families = family_order(runs)
    return {
        "n_runs": len(runs),
        "n_ok": int(ok.sum()),
        "n_failed": int((~ok).sum()),
        "families": [
            {"name": f, "kind": str(runs.loc[runs["family"] == f, "family_kind"].iloc[0])} for f in families
        ],
        "n_conditions": len(per_condition),
        "seeds": seed_text(seeds),
        "seeds_per_condition": (
            f"{per_condition.min()}"
            if per_condition.min() == per_condition.max()
            else f"{per_condition.min()}–{per_condition.max()}"
        ),
        "models": ", ".join(md_text(m) for m in unique_text(runs, cfg("model.name"))) or "unknown model",
        "data": md_text(data_description(runs)),
        "devices": ", ".join(md_text(d) for d in unique_text(runs, "device")) or "unknown device",
        # Finished runs whose record says its numbers may not repeat bit for bit (CUDA kernels).
        "n_not_bitwise": int((ok & (runs["bitwise_reproducible"] == False)).sum())  # noqa: E712 (None = unknown)
        if "bitwise_reproducible" in runs.columns else 0,
    }


# Recipe settings worth a line in the setup table when the runs table has them (values differ per
# variant where a family varies them, e.g. the learning rate per method).
RECIPE_COLUMNS = (
    ("Max tokens per example", cfg("data.max_length")),
    ("Epochs", cfg("train.epochs")),
    ("Batch size", cfg("train.batch_size")),
    ("Learning rates", cfg("train.lr")),
    ("Optimizer", cfg("train.optimizer")),
    ("Schedule", cfg("train.schedule")),
    ("Precision", cfg("train.precision")),
)


def cpu_kinds(runs: pd.DataFrame) -> list[str]:
    """Each distinct CPU the runs' records name, as "<vendor family model stepping> (<torch kernels>)"; empty for
    tables without the columns or records from before they existed."""
    if "cpu_capability" not in runs.columns:
        return []
    ids = runs["cpu_id"] if "cpu_id" in runs.columns else pd.Series("", index=runs.index)
    kinds = {f"{cpu_id or 'unknown CPU'} ({capability})" for cpu_id, capability in zip(ids.fillna(""),
                                                                                       runs["cpu_capability"].fillna(""))
             if capability}
    return sorted(kinds)


def setup_rows(runs: pd.DataFrame, meta: dict) -> list[tuple[str, str]]:
    def joined(column: str) -> str:
        values = unique_text(runs, column)
        return ", ".join(md_text(v) for v in values) if values else "not recorded"

    rows = [
        ("Model", joined(cfg("model.name"))),
        ("Model source", joined(cfg("model.source"))),
        ("Data", md_text(data_description(runs))),
        ("Hardware / device", joined("device")),
        ("Git commit", joined("git_sha")),
    ]
    if cpus := cpu_kinds(runs):
        # more than one means the runs' arithmetic may differ in rounding, not only in time
        rows.insert(4, ("CPU (torch kernels)", ", ".join(md_text(c) for c in cpus)))
    # The split sizes the records say were used; the max_examples caps only for records from before sizes.
    sizes = [f"data.size.{split}" for split in ("train", "validation", "test")]
    caps = [cfg(f"data.max_examples.{split}") for split in ("train", "validation", "test")]
    if any(c in runs.columns for c in sizes):
        ok = runs[runs["status"] == "ok"] if "status" in runs else runs
        rows.append(("Examples used (train / validation / test)",
                     " / ".join(", ".join(md_text(v) for v in unique_text(ok, c)) or "–" for c in sizes)))
    elif all(c in runs.columns for c in caps):
        rows.append(("Examples used (train / validation / test)", " / ".join(joined(c) for c in caps)))
    for label, column in RECIPE_COLUMNS:
        if column in runs.columns:
            rows.append((label, joined(column)))
    version_columns = sorted(c for c in runs.columns if c.startswith("versions."))
    preferred = [f"versions.{p}" for p in ("torch", "transformers", "peft")]
    for column in [c for c in preferred if c in version_columns] + [
        c for c in version_columns if c not in preferred
    ]:
        rows.append((f"{column.split('.', 1)[1]} version", joined(column)))
    for column in preferred:
        if column not in version_columns:
            rows.append((f"{column.split('.', 1)[1]} version", "not recorded"))
    seeds = sorted({int(s) for s in runs["seed"].dropna()})
    rows.append(("Seeds", seed_text(seeds)))
    for key, value in (meta or {}).items():
        if key not in ("title",):
            rows.append((md_text(key), md_text(value)))
    return rows


def headline(tables: dict, families: list[dict]) -> dict:
    """The findings the report opens with, from the family sections (``sections.family``): significant claims between
    runs that trained, the comparisons left inconclusive, and the memory and time claims."""
    summary, tests = tables["summary"], tables["tests"]
    kinds = {f["kind"] for f in families}
    claims = [claim for family in families for claim in family["claims"]]
    return {
        # A study of cost-only families may have no accuracy anywhere; the prose then says so.
        "has_accuracy": bool(((summary["metric"] == PRIMARY_METRIC) & (summary["split"] == PRIMARY_SPLIT)).any()),
        "has_memory_time": any(kind_spec(kind).cost_only for kind in kinds),
        "cost_only": bool(kinds) and all(kind_spec(kind).cost_only for kind in kinds),
        "cost_claims": [claim for family in families for claim in family["cost_claims"]],
        "main_claims": [
            claim["text"]
            for family in families
            if not kind_spec(family["kind"]).epoch_tests  # epochs of one variant are no finding about methods
            for claim in family["claims"]
            # A difference between runs that did not train measures the budget, not the method.
            if claim["verdict"] in ("better", "worse") and claim["convergence"] in ("trained", "unknown")
        ],
        "n_inconclusive": sum(claim["convergence"] == "inconclusive" for claim in claims),
        "n_significant_untrained": sum(
            claim["convergence"] == "inconclusive" and claim["verdict"] in ("better", "worse") for claim in claims),
        "n_tested": int((tests["p_value"].notna() & (tests["metric"] == PRIMARY_METRIC)
                         & (tests["split"] == PRIMARY_SPLIT)).sum()),
    }
