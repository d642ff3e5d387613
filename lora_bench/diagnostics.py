"""Did a run learn? Four flags on every run, so that a verdict is never drawn from a run that did not train.

A benchmark's comparison of two methods means something only when both runs trained: a run that answers one
class, or whose loss is still falling steeply when it stops, measures the training budget, not the method.
Each flag reads the validation split or the training curve, never the test split, so flagging a run cannot
select on the numbers it is judged by.

- ``learned``: validation accuracy at the selected epoch is above the majority-class rate of the validation
  split, by a one-sided exact binomial test at p < ``LEARNED_ALPHA`` (0.01): H0 says each answer is right with
  the probability of always answering the majority class.
- ``collapsed``: one class makes up at least ``COLLAPSE_SHARE`` (95 %) of the validation predictions at the
  selected epoch (a closed-answer instruct run that answers one class throughout too).
- ``diverged``: a non-finite loss (the run stopped, ``error_kind`` ``non_finite_loss``), or a final logged
  training loss above the first logged one.
- ``plateaued``: the training loss has levelled off: its mean over the last fifth of the logged points fell by
  less than ``PLATEAU_REL_DECREASE`` (5 %) relative to the fifth before; or validation already peaked before
  the last epoch (the selected epoch is not the last, so more of the same training would not be chosen).
  The loop logs the training loss at ``LOSS_POINTS_PER_EPOCH`` (10) evenly spaced points per epoch (each the
  mean over the steps since the previous point), so the rule has points to compare in one-epoch runs too.

A run is **trained** when it learned, did not collapse, did not diverge and plateaued. ``expect: no_learning``
on a variant marks a run that is meant to show a bad setting; the report then reads its flags as expected.
"""

from __future__ import annotations

import math

import numpy as np

LEARNED_ALPHA = 0.01
COLLAPSE_SHARE = 0.95
PLATEAU_REL_DECREASE = 0.05
LOSS_POINTS_PER_EPOCH = 10
FLAGS = ("learned", "collapsed", "diverged", "plateaued")


def binomial_upper_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p), exact (log-space sum; no scipy import in a training job)."""
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    logs = [math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * log_p
            + (trials - k) * log_q for k in range(successes, trials + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def prediction_shape(actual: np.ndarray, predicted: np.ndarray) -> dict:
    """Examples, the majority-class rate of the truth and the largest share of one predicted class."""
    n = len(actual)
    if n == 0:
        return {"n": 0, "majority_rate": math.nan, "max_class_share": math.nan}
    return {"n": n, "majority_rate": float(np.bincount(actual).max() / n),
            "max_class_share": float(np.bincount(predicted).max() / n)}


def relative_decrease_last_fifth(losses: list[float]) -> float:
    """(mean of the fifth before the last - mean of the last fifth) / mean of the fifth before; NaN if < 2 points."""
    if len(losses) < 2:
        return math.nan
    window = max(1, len(losses) // 5)
    last, before = np.mean(losses[-window:]), np.mean(losses[-2 * window:-window])
    return float((before - last) / before) if before > 0 else math.nan


def diagnose(selected: dict, loss_curve: list[list[float]], selected_epoch: int, last_epoch: int) -> dict:
    """The four flags and the numbers behind them, from the selected epoch's validation metrics and the curve.

    ``selected`` holds ``validation_accuracy`` and, where the task measures them, ``validation_n``,
    ``validation_majority_rate`` and ``validation_max_class_share``; ``loss_curve`` is ``[[step, loss], ...]``.
    Flags that cannot be computed (no validation split, too few points) are None.
    """
    out: dict = {"learned": None, "learned_p": None, "collapsed": None, "diverged": None, "plateaued": None,
                 "loss_decrease_last_fifth": None}
    n = selected.get("validation_n")
    if n and "validation_accuracy" in selected:
        correct = round(selected["validation_accuracy"] * n)
        p = binomial_upper_tail(correct, n, selected["validation_majority_rate"])
        out.update(learned=bool(p < LEARNED_ALPHA), learned_p=p)
    share = selected.get("validation_max_class_share")
    if share is not None and not math.isnan(share):
        out["collapsed"] = bool(share >= COLLAPSE_SHARE)
    losses = [loss for _, loss in loss_curve]
    if losses:
        out["diverged"] = bool(not all(map(math.isfinite, losses)) or losses[-1] > losses[0])
        decrease = relative_decrease_last_fifth(losses)
        out["loss_decrease_last_fifth"] = None if math.isnan(decrease) else decrease
        peaked_earlier = selected_epoch < last_epoch
        if peaked_earlier or not math.isnan(decrease):
            out["plateaued"] = bool(peaked_earlier or decrease < PLATEAU_REL_DECREASE)
    return out


def failed_diagnosis(error_kind: str) -> dict:
    """A failed run: diverged when its loss went non-finite; the other flags are unknown."""
    return {"learned": None, "learned_p": None, "collapsed": None,
            "diverged": True if error_kind == "non_finite_loss" else None, "plateaued": None,
            "loss_decrease_last_fifth": None}


def trained(flags: dict) -> bool | None:
    """Learned, not collapsed, not diverged and plateaued; None when a flag is unknown."""
    values = [flags.get(f) for f in FLAGS]
    if any(v is None for v in values):
        return None
    learned, collapsed, diverged, plateaued = values
    return bool(learned and not collapsed and not diverged and plateaued)
