"""The claims of reference B (the LLM instruction-finetuning write-up), tested on instruct families.

Each claim compares two conditions of one family, found from the runs' resolved configs (``cfg.*`` columns) rather
than from variant names, so a study may name its variants freely; ``instruct_claims`` tests each with
``compare.compare_two`` (paired on seed) and, where the runs kept their predictions, with the crossed items x seeds
test of ``analysis.items`` too, which then carries the verdict (as it does in the report's findings): the test
questions are a sample as much as the seeds are. Holm's correction runs over the claims of the family.
``run_claims`` writes the ``claims`` table (the ``stats`` step), which the report reads.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from lora_bench.analysis.columns import PREFIX, cfg
from lora_bench.analysis.compare import baseline_variant, compare_two, convergence, holm
from lora_bench.analysis.items import (
    EPOCH_CONDITION,
    ITEM_TEST,
    epoch_condition,
    epoch_conditions,
    item_comparison,
    read_predictions,
    stage_rows,
)
from lora_bench.analysis.summary import ALPHA, by_seed, family_order, metric_meta, select_values
from lora_bench.atomic import write_named_tables
from lora_bench.study import kind_spec

# (key, the reference's claim, what is compared). Each claim compares two conditions of one instruct family,
# found from the runs' resolved configs rather than from variant names, so a study may name them freely.
INSTRUCT_CLAIMS: tuple[tuple[str, str], ...] = (
    ("epochs", "Two epochs over the instructions are worse than one (overfitting)"),
    ("data_quality", "A small clean instruction set beats a several times larger noisy one (LIMA 1k beat Alpaca 50k)"),
    ("coverage", "LoRA on all linear layers beats query+value only"),
    ("alpha", "alpha = 2r is a good default (against alpha = r at the same r)"),
    ("cosine_sgd", "A cosine schedule helps SGD (against a constant learning rate)"),
)
ALL_LINEAR = {"query", "key", "value", "projection", "mlp"}
CLAIM_COLUMNS = ["family", "claim", "statement", "comparison", "metric", "split", "stage", "better", "worse",
                 "unit", "higher_is_better", "n_pairs", "paired", "mean_better", "mean_worse", "diff",
                 "diff_ci_low", "diff_ci_high", "detectable_diff", "test", "p_value", "p_holm", "item_design",
                 "item_diff", "item_diff_ci_low", "item_diff_ci_high", "item_detectable_diff", "item_p_value",
                 "verdict_test", "verdict_p_holm", "test_support", "untrained_better", "untrained_worse",
                 "convergence", "support", "note"]


def _kind(runs: pd.DataFrame, family: str) -> str:
    return str(runs.loc[runs["family"] == family, "family_kind"].iloc[0])


def _variant_settings(runs: pd.DataFrame, family: str) -> dict[str, dict]:
    """Resolved config values (``cfg.*`` columns) of each variant of ``family``, from its first run."""
    part = runs[runs["family"] == family]
    return {variant: rows.iloc[0].to_dict() for variant, rows in part.groupby("variant", sort=False)}


def _number(value, default=math.nan) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return default if math.isnan(out) else out


def _targets(settings: dict) -> set[str]:
    return set(str(settings.get(cfg("method.lora.targets")) or "").split("+")) - {""}


def _tests_every_epoch(settings: dict) -> bool:
    """``train.test_every_epoch`` of a variant (true when the column is absent: the run schema's default)."""
    value = settings.get(cfg("train.test_every_epoch"), True)
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).lower() not in ("false", "0")


def epoch_curve_variants(runs: pd.DataFrame, family: str) -> list[str]:
    """Variants of ``family`` with a test-accuracy curve over epochs: two epochs or more, tested after each.

    A variant that tests once (``train.test_every_epoch: false``) has one test value, at the epoch validation
    selects, so its seeds would scatter over epochs 1..n with one or two values each: not a curve.
    """
    settings = _variant_settings(runs, family)
    return [v for v, c in settings.items() if _number(c.get(cfg("train.epochs")), 1) >= 2 and _tests_every_epoch(c)]


# What may differ between the one- and the two-epoch runs of the epochs claim: the epochs, the tuned learning rate,
# and the seed of the run the settings were read from.
EPOCHS_CLAIM_FREE = ("train.epochs", "train.lr", "seed")


def _same_value(a, b) -> bool:
    """Equal config values, a missing one (None or NaN: the column absent from one variant's records) equal only to
    another missing one."""
    def missing(value) -> bool:
        return value is None or (isinstance(value, float) and math.isnan(value))
    return missing(a) == missing(b) and (missing(a) or str(a) == str(b))


def one_and_two_epoch_runs(runs: pd.DataFrame, family: str) -> tuple[str, str] | None:
    """The variants of ``family`` that train one and two epochs over the same data and are otherwise alike (the
    learning rate may differ: each is tuned for its own budget), both testing after every epoch; None if absent.

    The reference's claim is about two separate runs, each with its whole schedule: one pass over the
    instructions against two passes. Epochs 1 and 2 of one longer run are not that (after epoch 1 a decaying
    rate has not decayed and a constant one never does), so these variants, when a family has them, are what
    the epochs claim compares; the two-epoch run is read after its second epoch, whichever epoch validation
    would have selected, because the claim is about training twice as long."""
    settings = _variant_settings(runs, family)
    tested = [v for v, c in settings.items() if _tests_every_epoch(c)]
    ones = [v for v in tested if _number(settings[v].get(cfg("train.epochs")), 1) == 1]
    twos = [v for v in tested if _number(settings[v].get(cfg("train.epochs")), 1) == 2]
    free = {cfg(key) for key in EPOCHS_CLAIM_FREE}
    for one in ones:
        for two in twos:
            keys = {k for k in (*settings[one], *settings[two]) if k.startswith(PREFIX)} - free
            if all(_same_value(settings[one].get(k), settings[two].get(k)) for k in keys):
                return one, two
    return None


def _same_method(a: dict, b: dict) -> bool:
    return a.get(cfg("method.name")) == b.get(cfg("method.name"))


def instruct_pairs(runs: pd.DataFrame, family: str) -> dict[str, tuple]:
    """For each claim: (condition claimed better, condition claimed worse, stage), where a condition is a
    variant, or ``(variant, epoch)`` for the epochs claim. Claims whose conditions the family lacks are left out."""
    settings = _variant_settings(runs, family)
    baseline, _ = baseline_variant(runs, family)
    base = settings.get(baseline, {})
    pairs: dict[str, tuple] = {}
    if separate := one_and_two_epoch_runs(runs, family):
        one, two = separate
        pairs["epochs"] = ((one, 1), (two, 2), "epoch")
    elif multi_epoch := epoch_curve_variants(runs, family):
        # Else epoch 2 against epoch 1 of one run that tests every epoch, the longest such run first (an epochs
        # variant beside a multi-epoch baseline that tests once), then the baseline.
        variant = max(multi_epoch, key=lambda v: (_number(settings[v].get(cfg("train.epochs")), 1), v == baseline))
        pairs["epochs"] = ((variant, 1), (variant, 2), "epoch")
    noisy = [v for v, c in settings.items() if _number(c.get(cfg("instruct.noise_fraction")), 0.0) > 0]
    # On the Hub profile the real thing: LIMA (1k curated) against the Alpaca baseline (50k).
    lima = [v for v, c in settings.items() if "lima" in str(c.get(cfg("data.name"), "")).lower()]
    if noisy and baseline and _number(base.get(cfg("instruct.noise_fraction")), 0.0) == 0:
        pairs["data_quality"] = (baseline, noisy[0], "final")
    elif lima and "alpaca" in str(base.get(cfg("data.name"), "")).lower():
        pairs["data_quality"] = (lima[0], baseline, "final")
    if baseline and _targets(base) == {"query", "value"}:
        wide = [v for v, c in settings.items() if ALL_LINEAR <= _targets(c) and _same_method(c, base)
                and _number(c.get(cfg("method.lora.rank"))) == _number(base.get(cfg("method.lora.rank")))]
        if wide:
            pairs["coverage"] = (wide[0], baseline, "final")
    rank, alpha = _number(base.get(cfg("method.lora.rank"))), _number(base.get(cfg("method.lora.alpha")))
    if baseline and alpha == 2 * rank:
        equal = [v for v, c in settings.items() if _number(c.get(cfg("method.lora.rank"))) == rank
                 and _number(c.get(cfg("method.lora.alpha"))) == rank and _targets(c) == _targets(base)]
        if equal:
            pairs["alpha"] = (baseline, equal[0], "final")
    sgd = {c.get(cfg("train.schedule")): v for v, c in settings.items() if c.get(cfg("train.optimizer")) == "sgd"}
    if "cosine" in sgd and "constant" in sgd:
        pairs["cosine_sgd"] = (sgd["cosine"], sgd["constant"], "final")
    return pairs


def _condition_values(rows: pd.DataFrame, condition) -> pd.Series:
    if isinstance(condition, tuple):
        variant, epoch = condition
        rows = rows[(rows["variant"] == variant) & (rows["epoch"] == epoch)]
    else:
        rows = rows[rows["variant"] == condition]
    return by_seed(rows)


def _condition_name(condition) -> str:
    return epoch_condition(*condition) if isinstance(condition, tuple) else str(condition)


def instruct_claims(metrics: pd.DataFrame, runs: pd.DataFrame, predictions: pd.DataFrame | None = None
                    ) -> pd.DataFrame:
    """Each reference-B claim an instruct family can test: the claimed-better condition minus the claimed-worse
    one on test accuracy (test response loss when there is no closed answer set), paired on seed when possible.

    With ``predictions`` (the runs' per-question results), a claim on test accuracy is also tested by the crossed
    items x seeds t (``item_*`` columns), which then carries the verdict (``verdict_test``): two variants on
    their selected epochs' predictions (stage ``final``), two epochs of one variant on the test predictions its
    runs kept after every epoch (stage ``epoch``; runs recorded before those were kept stay with the seed-level
    paired t). ``p_holm`` is Holm over the family's seed-level p
    values, ``verdict_p_holm`` over the p values carrying the verdicts. ``test_support``: ``supported`` (significant
    in the claimed direction), ``contradicted`` (significant the other way) or ``not shown`` (n.s., or untestable);
    ``support`` is that, or ``inconclusive`` when a run of either condition did not converge (``convergence``,
    ``untrained_better`` / ``untrained_worse``: the learning diagnostics, as in the tests table)."""
    predictions = predictions if predictions is not None else pd.DataFrame()
    rows: list[dict] = []
    families = [f for f in family_order(runs) if kind_spec(_kind(runs, f)).reference_claims] \
        if "family_kind" in runs else []
    statements = dict(INSTRUCT_CLAIMS)
    for family in families:
        family_rows = []
        family_metrics = metrics[metrics["family"] == family]
        # Closed answers give accuracy; open-ended data the LM evaluation harness (its mean over tasks) when it
        # ran, else the held-out response loss (comparable only between variants trained on the same data).
        if not select_values(family_metrics, "accuracy", "test").empty:
            metric, split = "accuracy", "test"
        elif not select_values(family_metrics, "lm_eval", "mean").empty:
            metric, split = "lm_eval", "mean"
        else:
            metric, split = "loss", "test"
        for claim, (better, worse, stage) in instruct_pairs(runs, family).items():
            claim_split = "test" if stage == "epoch" and metric == "lm_eval" else split
            claim_metric = "loss" if stage == "epoch" and metric == "lm_eval" else metric
            selected = select_values(metrics, claim_metric, claim_split, stage)
            selected = selected[selected["family"] == family]
            unit, higher = metric_meta(selected) if len(selected) else ("", claim_metric != "loss")
            first, second = _condition_values(selected, better), _condition_values(selected, worse)
            comparison = compare_two(first, second)
            family_rows.append({
                "family": family, "claim": claim, "statement": statements[claim],
                "comparison": f"{_condition_name(better)} vs {_condition_name(worse)}",
                "metric": claim_metric, "split": claim_split, "stage": stage,
                "better": _condition_name(better), "worse": _condition_name(worse),
                "unit": unit, "higher_is_better": higher,
                "n_pairs": comparison["n_pairs"], "paired": comparison["paired"],
                "mean_better": comparison["mean_variant"], "mean_worse": comparison["mean_baseline"],
                "diff": comparison["diff"], "diff_ci_low": comparison["diff_ci_low"],
                "diff_ci_high": comparison["diff_ci_high"], "detectable_diff": comparison["detectable_diff"],
                "test": comparison["test"],
                "p_value": comparison["p_value"], "note": comparison.get("note", ""),
                **_item_columns(predictions, runs, family, better, worse, claim_metric, claim_split),
                **_claim_convergence(runs, family, better, worse),
            })
        if not family_rows:
            continue
        frame = pd.DataFrame(family_rows).reindex(columns=CLAIM_COLUMNS)  # item columns present when unused
        frame["p_holm"] = holm(frame["p_value"]).to_numpy()
        by_items = frame["item_p_value"].notna()
        frame["verdict_test"] = np.where(by_items, ITEM_TEST, frame["test"])
        frame["verdict_p_holm"] = holm(frame["item_p_value"].where(by_items, frame["p_value"])).to_numpy()
        verdict_diff = frame["item_diff"].where(by_items, frame["diff"])
        significant = (frame["verdict_p_holm"] < ALPHA).fillna(False)
        as_claimed = np.where(frame["higher_is_better"].astype(bool), verdict_diff > 0, verdict_diff < 0)
        frame["test_support"] = np.where(significant, np.where(as_claimed, "supported", "contradicted"), "not shown")
        # As in the findings: a verdict on runs that did not learn, collapsed, diverged or had not levelled off is no
        # verdict, whichever way its test went (test_support keeps what the test alone said).
        frame["support"] = np.where(frame["convergence"] == "inconclusive", "inconclusive", frame["test_support"])
        rows.extend(frame.to_dict("records"))
    return pd.DataFrame(rows).reindex(columns=CLAIM_COLUMNS)


def _item_columns(predictions: pd.DataFrame, runs: pd.DataFrame, family: str, better, worse, metric: str,
                  split: str) -> dict:
    """The crossed items x seeds test of a claim on accuracy: between two variants on the selected epochs'
    predictions, or between two epochs of one variant on the test predictions kept after each epoch; empty
    when there is none (another metric, or runs that kept no such predictions)."""
    if metric != "accuracy" or predictions.empty or isinstance(better, tuple) != isinstance(worse, tuple):
        return {}
    if isinstance(better, tuple):
        item = item_comparison(epoch_conditions(stage_rows(predictions, "epoch")), runs, family,
                               _condition_name(better), _condition_name(worse), split, column=EPOCH_CONDITION)
    else:
        item = item_comparison(stage_rows(predictions, "final"), runs, family, str(better), str(worse), split)
    if item is None or not np.isfinite(item["p_value"]):
        return {}
    return {"item_design": item["design"], "item_diff": item["diff"], "item_diff_ci_low": item["diff_ci_low"],
            "item_diff_ci_high": item["diff_ci_high"], "item_detectable_diff": item["detectable_diff"],
            "item_p_value": item["p_value"]}


def _claim_convergence(runs: pd.DataFrame, family: str, better, worse) -> dict:
    """``compare.convergence`` of the variants behind the two conditions (an epoch condition is its variant's run)."""
    variant_better = better[0] if isinstance(better, tuple) else better
    variant_worse = worse[0] if isinstance(worse, tuple) else worse
    if variant_better == variant_worse:  # epochs of one variant: its runs counted once
        state = convergence(runs, family, variant_better, None)
        return {"untrained_better": state["untrained_variant"], "untrained_worse": state["untrained_variant"],
                "convergence": state["convergence"]}
    state = convergence(runs, family, variant_better, variant_worse)
    return {"untrained_better": state["untrained_variant"], "untrained_worse": state["untrained_baseline"],
            "convergence": state["convergence"]}


def run_claims(tables_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Read ``metrics``, ``runs`` and (when present) ``predictions``; write the ``claims`` table (empty, with its
    columns, when the study has no family testing reference claims). What ``stats`` calls after the item tables."""
    tables_dir = Path(tables_dir)
    metrics = pd.read_parquet(tables_dir / "metrics.parquet")
    runs = pd.read_parquet(tables_dir / "runs.parquet")
    predictions = read_predictions(tables_dir, stage=None)
    return write_named_tables({"claims": instruct_claims(metrics, runs, predictions)}, out_dir)
