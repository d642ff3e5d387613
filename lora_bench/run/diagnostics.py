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
- ``plateaued``: more of the same training would no longer lower a **held-out** loss by much. Held out matters:
  after the first epoch the training loss keeps falling as the model fits its own training set (full
  finetuning drives it towards 0 while validation has long levelled off), so it cannot say whether training
  has converged. Two curves are held out:

  * **one-epoch runs: the training loss itself.** Within the first epoch every batch is scored before the
    model has trained on it (progressive validation), so its loss is an unbiased held-out estimate. The loop
    logs it at ``LOSS_POINTS_PER_EPOCH`` (10) evenly spaced points per epoch (each the mean over the steps
    since the previous point). A least-squares line through the last half of the points gives the slope; the
    run is *still falling* when that slope is significantly negative (one-sided t test, p < 0.05) **and**
    continuing at that slope for another fifth of the run would lower the loss by at least
    ``PLATEAU_REL_DECREASE`` (5 %) of its recent mean. The significance requirement keeps minibatch noise from
    flagging flat curves; the size requirement keeps a tiny but steady decline from counting as unfinished.
  * **runs of two epochs or more: the validation loss at the end of each epoch.** The run is *still falling*
    when continuing at its last epoch's rate for another fifth of the run (``epochs / 5`` more epochs) would
    lower the validation loss by at least ``PLATEAU_REL_DECREASE`` of its last value. Runs that did not
    evaluate validation every epoch fall back to the training-loss rule.

  A run plateaued when it is not still falling, or when validation already peaked before the last epoch (the
  selected epoch is not the last, so more of the same training would not be chosen).

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


# One-sided 95 % quantiles of Student's t by degrees of freedom (no scipy import in a training job); above 30
# the normal quantile.
T_95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        12: 1.782, 15: 1.753, 20: 1.725, 25: 1.708, 30: 1.697}


def _t_95(df: int) -> float:
    return T_95[max(k for k in T_95 if k <= df)] if df <= 30 else 1.645


def still_falling(losses: list[float]) -> tuple[bool | None, float]:
    """(whether the loss is still falling, the projected relative decrease over another fifth of the run).

    See the module docstring; None with fewer than 4 points in the last half.
    """
    tail = np.asarray(losses[len(losses) // 2:], dtype=float)
    if len(tail) < 4 or not np.all(np.isfinite(tail)):
        return None, math.nan
    x = np.arange(len(tail), dtype=float)
    x -= x.mean()
    slope = float((x * (tail - tail.mean())).sum() / (x * x).sum())
    residual = tail - tail.mean() - slope * x
    se = math.sqrt(float((residual**2).sum()) / (len(tail) - 2) / float((x * x).sum()))
    projected = -slope * (len(losses) / 5) / tail.mean() if tail.mean() > 0 else math.nan
    significant = slope < 0 and (se == 0 or -slope / se > _t_95(len(tail) - 2))
    return bool(significant and projected >= PLATEAU_REL_DECREASE), projected


def validation_still_falling(validation_losses: list[float]) -> tuple[bool | None, float]:
    """(whether the per-epoch validation loss is still falling, the projected relative decrease over another
    fifth of the run at the last epoch's rate). None with fewer than two epochs or a missing value."""
    if len(validation_losses) < 2 or not all(v is not None and math.isfinite(v) for v in validation_losses):
        return None, math.nan
    previous, last = validation_losses[-2], validation_losses[-1]
    if last <= 0:
        return None, math.nan
    projected = (previous - last) * (len(validation_losses) / 5) / last
    return bool(projected >= PLATEAU_REL_DECREASE), projected


def diagnose(selected: dict, loss_curve: list[list[float]], selected_epoch: int, last_epoch: int,
             validation_losses: list[float] | None = None) -> dict:
    """The four flags and the numbers behind them, from the selected epoch's validation metrics and the curves.

    ``selected`` holds ``validation_accuracy`` and, where the task measures them, ``validation_n``,
    ``validation_majority_rate`` and ``validation_max_class_share``; ``loss_curve`` is ``[[step, loss], ...]``;
    ``validation_losses`` the validation loss at the end of each epoch, in order (the held-out curve of runs
    of two epochs or more). Flags that cannot be computed (no validation split, too few points) are None;
    ``plateau_curve`` says which curve judged ``plateaued``.
    """
    out: dict = {"learned": None, "learned_p": None, "collapsed": None, "diverged": None, "plateaued": None,
                 "loss_decrease_last_fifth": None, "plateau_curve": None}
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
    falling, projected, curve = validation_still_falling(validation_losses or []) + ("validation_loss",)
    if falling is None and losses:
        falling, projected, curve = still_falling(losses) + ("train_loss",)
    out["loss_decrease_last_fifth"] = None if math.isnan(projected) else projected
    peaked_earlier = selected_epoch < last_epoch
    if peaked_earlier or falling is not None:
        out["plateaued"] = bool(peaked_earlier or not falling)
        out["plateau_curve"] = curve if falling is not None else "selected_epoch"
    return out


def failed_diagnosis(error_kind: str) -> dict:
    """A failed run: diverged when its loss went non-finite; the other flags are unknown."""
    return {"learned": None, "learned_p": None, "collapsed": None,
            "diverged": True if error_kind == "non_finite_loss" else None, "plateaued": None,
            "loss_decrease_last_fifth": None, "plateau_curve": None}


def trained(flags: dict) -> bool | None:
    """Learned, not collapsed, not diverged and plateaued; None when a flag is unknown."""
    values = [flags.get(f) for f in FLAGS]
    if any(v is None for v in values):
        return None
    learned, collapsed, diverged, plateaued = values
    return bool(learned and not collapsed and not diverged and plateaued)
