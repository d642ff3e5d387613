"""The learning diagnostics on constructed curves and predictions (lora_bench.run.diagnostics), and in records."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lora_bench.config import RunConfig
from lora_bench.run.diagnostics import (
    binomial_upper_tail,
    diagnose,
    failed_diagnosis,
    prediction_shape,
    still_falling,
    trained,
)
from lora_bench.run.train import run_training


@pytest.mark.parametrize(("k", "n", "p"), [(0, 10, 0.5), (7, 10, 0.5), (120, 200, 0.5), (200, 200, 0.5),
                                           (130, 200, 0.6), (5000, 9000, 0.55), (3, 4, 0.99)])
def test_binomial_tail_equals_scipy(k, n, p):
    assert binomial_upper_tail(k, n, p) == pytest.approx(scipy_stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300)


def _selected(accuracy, n=200, majority=0.5, share=0.5):
    return {"validation_accuracy": accuracy, "validation_n": n, "validation_majority_rate": majority,
            "validation_max_class_share": share}


FALLING_THEN_FLAT = [[i + 1, 0.7 * math.exp(-i / 3) + 0.2] for i in range(30)]


def test_learned_needs_validation_accuracy_significantly_above_the_majority_rate():
    # 200 balanced examples: 58 % right is p ~ 0.013 (not learned at 0.01), 60 % is p ~ 0.003 (learned).
    assert not diagnose(_selected(0.58), FALLING_THEN_FLAT, 1, 1)["learned"]
    assert diagnose(_selected(0.60), FALLING_THEN_FLAT, 1, 1)["learned"]
    # Imbalanced: 70 % majority class, 72 % accuracy is not learning anything.
    assert not diagnose(_selected(0.72, majority=0.7, share=0.9), FALLING_THEN_FLAT, 1, 1)["learned"]


def test_collapsed_when_one_class_makes_95_percent_of_the_predictions():
    actual = np.array([0] * 100 + [1] * 100)
    predicted = np.array([1] * 191 + [0] * 9)
    shape = prediction_shape(actual, predicted)
    assert shape == {"n": 200, "majority_rate": 0.5, "max_class_share": 0.955}
    flags = diagnose(_selected(0.545, share=shape["max_class_share"]), FALLING_THEN_FLAT, 1, 1)
    assert flags["collapsed"] and not flags["learned"]
    assert not diagnose(_selected(0.8, share=0.94), FALLING_THEN_FLAT, 1, 1)["collapsed"]


def test_diverged_when_the_loss_ends_above_where_it_started_or_is_not_finite():
    rising = [[i + 1, 0.69 + 0.01 * i] for i in range(10)]
    assert diagnose(_selected(0.5), rising, 1, 1)["diverged"]
    assert diagnose(_selected(0.5), [[1, 0.7], [2, math.nan]], 1, 1)["diverged"]
    assert not diagnose(_selected(0.8), FALLING_THEN_FLAT, 1, 1)["diverged"]
    assert failed_diagnosis("non_finite_loss")["diverged"] is True and failed_diagnosis("config")["diverged"] is None


def test_plateaued_on_a_flat_tail_not_on_a_still_falling_curve():
    rng = np.random.default_rng(0)
    assert diagnose(_selected(0.8), FALLING_THEN_FLAT, 3, 3)["plateaued"]
    # The reference's epochs family: per-epoch means 0.675, 0.565, 0.486 over three epochs, with minibatch noise.
    falling = [[i + 1, 0.675 - 0.0095 * i + rng.normal(0, 0.02)] for i in range(30)]
    assert still_falling([p[1] for p in falling])[0]
    assert not diagnose(_selected(0.8), falling, 3, 3)["plateaued"]
    # Validation peaked before the last epoch: more of the same training would not be selected.
    assert diagnose(_selected(0.8), falling, 2, 3)["plateaued"]
    # A flat but noisy curve (a one-epoch run at chance) is not "still falling": noise is not a trend.
    noisy = [[i + 1, 0.69 + rng.normal(0, 0.04)] for i in range(10)]
    assert diagnose(_selected(0.5), noisy, 1, 1)["plateaued"]
    # A tiny steady decline late in training (1 % per fifth) counts as levelled off.
    creeping = [[i + 1, 0.30 - 0.0003 * i] for i in range(30)]
    assert not still_falling([p[1] for p in creeping])[0]
    assert diagnose(_selected(0.8), [[1, 0.7], [2, 0.6]], 1, 1)["plateaued"] is None


def test_trained_only_when_every_flag_is_good():
    good = {"learned": True, "collapsed": False, "diverged": False, "plateaued": True}
    assert trained(good)
    for flag, bad in (("learned", False), ("collapsed", True), ("diverged", True), ("plateaued", False)):
        assert trained({**good, flag: bad}) is False, flag
    assert trained({**good, "plateaued": None}) is None


def test_a_run_records_its_loss_curve_and_flags(tiny_run):
    tiny_run["train"]["epochs"] = 2
    result = run_training(RunConfig.from_dict(tiny_run))
    curve = result.metrics["train_loss_curve"]
    steps = result.timing["optimizer_steps"]
    # Ten points per epoch, or one per step when an epoch has fewer steps.
    assert len(curve) == min(steps, 2 * 10) and curve[-1][0] == steps
    assert set(result.diagnostics) >= {"learned", "collapsed", "diverged", "plateaued", "learned_p"}
    epoch = next(e for e in result.metrics["epochs"] if e["epoch"] == result.metrics["selected_epoch"])
    assert 0 < epoch["validation_majority_rate"] <= 1 and epoch["validation_n"] > 0


def test_runs_of_two_epochs_or_more_are_judged_on_the_validation_loss_not_the_training_loss():
    # Full finetuning at 3 epochs: the training loss keeps falling (fitting the training set) while the
    # held-out loss has levelled off (the 3-epoch converged reference's full runs: 0.441, 0.412, 0.424).
    memorising = [[i + 1, 0.6 * math.exp(-i / 8)] for i in range(30)]
    assert still_falling([p[1] for p in memorising])[0]
    flags = diagnose(_selected(0.8), memorising, 3, 3, [0.441, 0.412, 0.424])
    assert flags["plateaued"] and flags["plateau_curve"] == "validation_loss"
    assert flags["loss_decrease_last_fifth"] < 0
    # The 3-epoch reference's LoRA seed 1: 0.587, 0.508, 0.465: another 0.6 epoch at that rate is 5.6 % lower: not
    # done (the reference now trains 5 epochs).
    flags = diagnose(_selected(0.8), FALLING_THEN_FLAT, 3, 3, [0.587, 0.508, 0.465])
    assert not flags["plateaued"]
    assert flags["loss_decrease_last_fifth"] == pytest.approx((0.508 - 0.465) * 3 / 5 / 0.465)
    # ... and 0.527, 0.444, 0.433 (2.4 % over the last epoch, 1.4 % per further fifth) is levelled off.
    assert diagnose(_selected(0.8), FALLING_THEN_FLAT, 3, 3, [0.527, 0.444, 0.433])["plateaued"]


def test_one_epoch_runs_and_runs_without_per_epoch_validation_use_the_training_loss():
    falling = [[i + 1, 0.69 - 0.02 * i] for i in range(10)]
    for validation in (None, [0.6], [0.6, None]):
        flags = diagnose(_selected(0.8), falling, 1, 1, validation)
        assert flags["plateau_curve"] == "train_loss" and not flags["plateaued"]
    # Validation peaked earlier decides even without a curve.
    flags = diagnose(_selected(0.8), [[1, 0.7]], 1, 2, None)
    assert flags["plateaued"] and flags["plateau_curve"] == "selected_epoch"
