"""How much to trust a single run: where the variance comes from, and the winner's curse of a sweep.

Tables in, tables out, like ``lora_bench.analysis.summary`` (which this module builds on). Two family kinds:

- **variance**: a few data seeds (``data.split_seed``: which examples land in train, validation and test)
  crossed with a few train seeds (``seed``: initialisation, data order, dropout) per setting (method).
  ``variance_components`` fits, per setting, the crossed random-effects model

      accuracy[d, t] = mu + a[d] + b[t] + e[d, t],   a ~ N(0, s2_data), b ~ N(0, s2_train), e ~ N(0, s2_resid)

  by REML (``statsmodels`` ``MixedLM``, one group, two variance components; L-BFGS, then Powell). ``b`` is the
  part of a train seed's luck that it keeps on every split (same head and LoRA initialisation); ``e`` is
  the rest, i.e. the training randomness specific to one split (on a deterministic CPU there is no other
  noise in a run), so the *train-seed share* of the variance is (s2_train + s2_resid) / total and the
  *data-split share* is s2_data / total. Intervals are **parametric bootstrap** percentile intervals
  (``VC_RESAMPLES`` simulations from the fitted model on the same design, each refitted by REML): they
  handle estimates on the boundary (a component of 0) and shares, which profile or Wald intervals of
  MixedLM do not. With 3 data seeds, s2_data has about two degrees of freedom: expect wide intervals.

  **Fallback: ANOVA (method of moments).** On degenerate data (a component of exactly 0, values that are
  exactly additive) REML's optimiser walks to the boundary, where its linear algebra is singular; whether
  it then raises (``LinAlgError: Singular matrix``), returns NaN or gets through depends on the processor's
  floating-point path. So a fit that raises a numerical error (``NUMERICAL_ERRORS``), gives non-finite
  estimates, does not converge or puts the residual variance at 0 (where the REML likelihood is unbounded)
  is replaced by ``anova_components``: Henderson's method III, the sums-of-squares estimator of the
  crossed design. For the balanced design (one run per data seed x train seed) it is the two-way ANOVA:
  s2_resid = MS_error, s2_data = (MS_data - MS_error) / n_train, s2_train = (MS_train - MS_error) / n_data,
  which REML equals whenever no estimate is cut at 0; for an unbalanced design (a missing cell, repeated
  runs) it uses the reductions in residual sum of squares R(data | mu, train) and R(train | mu, data) of
  OLS fits and their expectations. Negative estimates are truncated at 0. The same fallback is applied to
  every bootstrap resample; ``method`` names the estimator of the point estimate, and ``note`` says why
  REML was replaced, on how many resamples, and which components sit on the boundary 0. The fit never
  raises on degenerate data: what cannot be estimated is NaN with a note.
- **sweep**: a grid run once per configuration; the winner is the configuration with the best
  validation accuracy (ties: lower validation loss at the selected epoch, then grid order), as the
  reference write-up picked its best LoRA setting; the top ``k`` are then re-run with fresh train and
  data seeds (``select_sweep`` decides them; the workflow's ``select_sweep`` checkpoint writes that
  selection as JSON and derives the re-run jobs from it). ``sweep_tables`` compares each re-run
  configuration's sweep score with its re-run mean, on validation (the selection metric) and test:

  * **optimism** = sweep score - re-run mean, with a 95 % t interval from the spread of the re-runs (the
    sweep score is the observed number being judged, so only the re-run mean is uncertain);
  * whether the sweep winner still has the best re-run mean, and ``p_best``, the share of bootstrap
    resamples of the re-runs (each configuration's re-runs resampled separately) in which it does;
  * regression toward the mean across the top k: mean optimism over the top k (t interval with the
    pooled re-run variances) and the slope of re-run mean on sweep score;
  * whether the top k differ at all after re-running: the F test of configuration in an OLS of the
    re-run scores on configuration plus (data seed, train seed) blocks, which every configuration shares.

  A numerical failure of the slope or the F test (``NUMERICAL_ERRORS``, a rank-deficient fit) leaves that
  number NaN and says so in the summary row's ``note``.

Output tables (parquet + CSV, written by ``write_tables``, empty with their columns when the study has no
such family): ``variance_components``, ``sweep_reeval`` (one row per family x configuration x split) and
``sweep_summary`` (one row per family x split). Column meanings are in the ``*_COLUMNS`` lists below and in
docs/tables.md.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from lora_bench.analysis.summary import ALPHA, BOOTSTRAP_SEED, CONFIDENCE, family_order, select_values
from lora_bench.atomic import write_named_tables
from lora_bench.study import SWEEP_KIND, VARIANCE_KIND

SELECTION_METRIC, SELECTION_SPLIT = "accuracy", "validation"
SWEEP_SPLITS = ("validation", "test")
VC_RESAMPLES = 200
P_BEST_RESAMPLES = 4999
# The numerical failures a fit on degenerate data can raise. They are caught at the one computation that
# raises them and turned into a fallback or a NaN with a note; anything else is a bug and propagates.
NUMERICAL_ERRORS = (np.linalg.LinAlgError, ValueError, FloatingPointError, ZeroDivisionError, OverflowError)
# A variance component below this share of the total is reported as on the boundary (0).
BOUNDARY_SHARE = 1e-6

VARIANCE_COLUMNS = [
    "family", "setting", "metric", "split", "n_runs", "n_data_seeds", "n_train_seeds", "mean",
    "sd_data", "sd_data_ci_low", "sd_data_ci_high",
    "sd_train", "sd_train_ci_low", "sd_train_ci_high",
    "sd_residual", "sd_residual_ci_low", "sd_residual_ci_high",
    "sd_total", "share_data", "share_data_ci_low", "share_data_ci_high",
    "share_train", "share_train_ci_low", "share_train_ci_high",
    "sd_between_data_means", "sd_within_data", "resamples", "method", "note",
]
REEVAL_COLUMNS = [
    "family", "setting", "split", "sweep_rank", "is_winner", "in_top_k", "sweep_score", "n_rerun",
    "rerun_mean", "rerun_std", "rerun_ci_low", "rerun_ci_high", "optimism", "optimism_ci_low",
    "optimism_ci_high", "rerun_rank", "p_best",
]
SUMMARY_COLUMNS = [
    "family", "split", "n_configs", "top_k", "n_reruns", "winner", "winner_sweep_score", "winner_rerun_mean",
    "winner_rerun_ci_low", "winner_rerun_ci_high", "optimism", "optimism_ci_low", "optimism_ci_high",
    "winner_still_best", "p_winner_best", "rerun_best", "topk_sweep_mean", "topk_rerun_mean", "topk_optimism",
    "topk_optimism_ci_low", "topk_optimism_ci_high", "slope", "differ_p", "differ", "note",
]


# ----------------------------------------------------------------------------------------------------
# Helpers


def _ok_rows(metrics: pd.DataFrame, family: str, metric: str, split: str, stage: str = "final") -> pd.DataFrame:
    rows = select_values(metrics, metric, split, stage)
    return rows[rows["family"] == family]


def _t_interval(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, se = float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(n))
    half = scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * se
    return mean - half, mean + half


def _percentile(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return math.nan, math.nan
    tail = (1 - CONFIDENCE) / 2 * 100
    return float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))


def families_of_kind(runs: pd.DataFrame, kind: str) -> list[str]:
    return [f for f in family_order(runs) if (runs.loc[runs["family"] == f, "family_kind"] == kind).any()]


# ----------------------------------------------------------------------------------------------------
# Variance components


def _reml(frame: pd.DataFrame) -> tuple[float, float, float, float, bool]:
    """(mu, s2_data, s2_train, s2_residual, converged) of the crossed model, on ``frame['y']``.

    May raise any of ``NUMERICAL_ERRORS`` on degenerate data; ``_fit_components`` handles that.
    """
    import statsmodels.formula.api as smf

    model = smf.mixedlm(
        "y ~ 1", frame, groups=np.ones(len(frame)), re_formula="0",
        vc_formula={"data": "0 + C(data_seed)", "train": "0 + C(train_seed)"},
    )
    with warnings.catch_warnings():
        # Boundary fits (a component of 0) warn; they are expected and handled by the bootstrap.
        warnings.simplefilter("ignore")
        fit = model.fit(reml=True, method=["lbfgs", "powell"])  # Powell when L-BFGS does not converge
    names = list(model.exog_vc.names)
    vc = dict(zip(names, np.asarray(fit.vcomp, dtype=float), strict=True))
    return float(fit.fe_params.iloc[0]), vc["data"], vc["train"], float(fit.scale), bool(fit.converged)


def _ols_residual(design: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, int]:
    """(residuals of the least-squares fit of ``response`` on ``design``, rank of ``design``).

    ``response`` may have several columns. Least squares by SVD copes with the rank-deficient dummy codings
    used here (an intercept plus every level of a factor).
    """
    coefficients, _, rank, _ = np.linalg.lstsq(design, response, rcond=None)
    return response - design @ coefficients, int(rank)


def anova_components(frame: pd.DataFrame) -> tuple[float, float, float]:
    """(s2_data, s2_train, s2_residual) of ``frame['y']`` by Henderson's method III (method of moments).

    With X_t = [1, Z_train], X_d = [1, Z_data] and X = [1, Z_data, Z_train], the residual sum of squares of
    the additive OLS fit estimates (n - rank X) s2_resid, and the reduction R(data | mu, train) =
    SSE(X_t) - SSE(X) has expectation (rank X - rank X_t) s2_resid + tr(Z_data' M_t Z_data) s2_data, M_t
    being the residual projection of X_t (the train effects drop out: M_t Z_train = 0); likewise for train.
    For the balanced design with one run per cell these are the two-way ANOVA mean squares of the module
    docstring. Estimates are not truncated (a negative one means the component is indistinguishable from 0);
    a component that the design cannot separate from the residual is NaN. Raises only ``NUMERICAL_ERRORS``.
    """
    y = frame["y"].to_numpy(float)
    n = len(y)
    ones = np.ones((n, 1))
    z_data = pd.get_dummies(frame["data_seed"]).to_numpy(float)
    z_train = pd.get_dummies(frame["train_seed"]).to_numpy(float)
    full = np.hstack([ones, z_data, z_train])
    given_train, given_data = np.hstack([ones, z_train]), np.hstack([ones, z_data])
    residual, rank_full = _ols_residual(full, y)
    df_error = n - rank_full
    if df_error < 1:
        return math.nan, math.nan, math.nan  # no replication left to estimate the residual from
    ms_error = float(residual @ residual) / df_error
    estimates = []
    for z, given in ((z_data, given_train), (z_train, given_data)):
        reduced, rank_given = _ols_residual(given, y)
        reduction = float(reduced @ reduced) - float(residual @ residual)
        projected, _ = _ols_residual(given, z)
        coefficient = float(np.sum(projected**2))  # tr(Z' M Z)
        if coefficient <= 1e-12 * n:
            estimates.append(math.nan)  # the factor is confounded with the other one
            continue
        estimates.append((reduction - (rank_full - rank_given) * ms_error) / coefficient)
    return estimates[0], estimates[1], ms_error


def _fit_components(frame: pd.DataFrame) -> tuple[np.ndarray, str, str]:
    """(s2_data, s2_train, s2_resid) of ``frame['y']``, the estimator used (``REML``, ``ANOVA`` or ``none``)
    and, when it is not REML, why.

    REML first; ``anova_components`` when REML raises a numerical error, returns a non-finite estimate, does
    not converge or puts the residual variance at 0 (exactly additive values). ``none`` (NaN estimates) only
    when the fallback fails as well.
    """
    try:
        *_, s2_data, s2_train, s2_resid, converged = _reml(frame)
        estimates = np.array([s2_data, s2_train, s2_resid], dtype=float)
        if not converged:
            problem = "did not converge"
        elif not np.all(np.isfinite(estimates)):
            problem = "gave a non-finite estimate"
        elif estimates[2] <= BOUNDARY_SHARE * np.maximum(estimates, 0).sum():
            # Exactly additive values: the REML likelihood grows without bound as s2_resid -> 0, so where
            # the optimiser stops says nothing about the other two components.
            problem = "put the residual variance at 0, where its likelihood is unbounded"
        else:
            return estimates, "REML", ""
    except NUMERICAL_ERRORS as error:
        problem = f"raised {type(error).__name__} ({error})"
    try:
        estimates = np.array(anova_components(frame), dtype=float)
    except NUMERICAL_ERRORS as error:
        return np.full(3, math.nan), "none", f"{problem}; the ANOVA fallback raised {type(error).__name__}"
    if not np.all(np.isfinite(estimates)):
        return np.full(3, math.nan), "none", f"{problem}; the ANOVA fallback cannot separate the components"
    return estimates, "ANOVA", problem


COMPONENT_NAMES = ("data", "train", "residual")
METHOD_NAMES = {
    "REML": "REML (statsmodels MixedLM)",
    "ANOVA": "ANOVA method of moments (Henderson III; REML failed)",
    "none": "none (REML and the ANOVA fallback both failed)",
}


def fit_variance_components(
    values: pd.DataFrame, resamples: int | None = None, seed: int = BOOTSTRAP_SEED
) -> dict:
    """Variance components of ``value`` by ``data_seed`` x ``train_seed``, with bootstrap intervals.

    ``values`` has columns ``value``, ``data_seed`` and ``train_seed`` (one row per run). Returns standard
    deviations (in the unit of ``value``), shares of the total variance and their 95 % parametric
    bootstrap percentile intervals; see the module docstring for the model, the REML estimator and its
    ANOVA fallback. Never raises on degenerate data: ``method`` and ``note`` say what was done.
    """
    resamples = resamples or VC_RESAMPLES
    frame = values[["value", "data_seed", "train_seed"]].dropna().reset_index(drop=True)
    n_data, n_train = frame["data_seed"].nunique(), frame["train_seed"].nunique()
    intervals = f"95 % parametric bootstrap percentile intervals, {resamples} resamples"
    out: dict = {"n_runs": len(frame), "n_data_seeds": n_data, "n_train_seeds": n_train,
                 "mean": float(frame["value"].mean()) if len(frame) else math.nan, "resamples": resamples,
                 "method": f"{METHOD_NAMES['REML']}, {intervals}", "note": ""}
    by_data = frame.groupby("data_seed")["value"]
    out["sd_between_data_means"] = float(by_data.mean().std(ddof=1)) if n_data > 1 else math.nan
    within = by_data.var(ddof=1).dropna()
    out["sd_within_data"] = float(math.sqrt(within.mean())) if len(within) else math.nan
    if n_data < 2 or n_train < 2 or len(frame) < 4:
        out["note"] = "needs at least two data seeds and two train seeds"
        return out
    # Fit on a standardised scale: accuracy variances of 1e-5 are awkward for the optimiser.
    center, scale = float(frame["value"].mean()), float(frame["value"].std(ddof=1))
    # Test constancy on the values: pandas' std of identical values can come out as 1e-17 rather than 0.
    if frame["value"].nunique() < 2 or not scale > 0:
        out.update(sd_data=0.0, sd_train=0.0, sd_residual=0.0, sd_total=0.0,
                   note="every run gave the same value: no variance to split")
        return out
    frame["y"] = (frame["value"] - center) / scale
    estimates, estimator, problem = _fit_components(frame)
    out["method"] = f"{METHOD_NAMES[estimator]}, {intervals}"
    notes = [] if estimator == "REML" else [f"REML {problem}"]
    if estimator == "ANOVA":
        notes[-1] += "; ANOVA (method of moments) estimates used"
    if estimator == "none":
        notes.append("no estimates")
        out["note"] = "; ".join(notes)
        return out

    # Parametric bootstrap on the same design; a resample whose REML fails gets the same fallback.
    rng = np.random.default_rng(seed)
    data_codes = frame["data_seed"].astype("category").cat.codes.to_numpy()
    train_codes = frame["train_seed"].astype("category").cat.codes.to_numpy()
    sims = np.full((resamples, 3), np.nan)
    sds = np.sqrt(np.maximum(estimates, 0))
    boot = frame[["data_seed", "train_seed"]].copy()
    fallbacks: dict[str, int] = {"ANOVA": 0, "none": 0}
    for b in range(resamples):
        a = rng.normal(0, sds[0], n_data)[data_codes]
        t = rng.normal(0, sds[1], n_train)[train_codes]
        boot["y"] = a + t + rng.normal(0, sds[2], len(frame))
        sims[b], resample_estimator, _ = _fit_components(boot)
        if resample_estimator != "REML":
            fallbacks[resample_estimator] += 1
    failed = fallbacks["ANOVA"] + fallbacks["none"]
    if failed:
        note = f"REML failed on {failed} of {resamples} resamples"
        if fallbacks["ANOVA"]:
            note += f"; ANOVA estimates used for {fallbacks['ANOVA']}"
        if fallbacks["none"]:
            note += f"; {fallbacks['none']} not estimable at all, left out of the intervals"
        notes.append(note)
    sims = np.maximum(sims, 0)
    raw = estimates
    estimates = np.maximum(estimates, 0)
    total = estimates.sum()
    for name, estimate, before in zip(COMPONENT_NAMES, estimates, raw, strict=True):
        if estimate <= BOUNDARY_SHARE * total:
            cut = " (a negative estimate truncated)" if before < 0 else ""
            notes.append(f"{name} component at the boundary 0{cut}")
    sim_total = sims.sum(axis=1)
    unit2 = scale**2
    for name, i in (("data", 0), ("train", 1), ("residual", 2)):
        out[f"sd_{name}"] = float(math.sqrt(estimates[i] * unit2))
        low, high = _percentile(np.sqrt(sims[:, i] * unit2))
        out[f"sd_{name}_ci_low"], out[f"sd_{name}_ci_high"] = low, high
    out["sd_total"] = float(math.sqrt(total * unit2))
    with np.errstate(invalid="ignore", divide="ignore"):
        share_data = sims[:, 0] / sim_total
    out["share_data"] = float(estimates[0] / total) if total > 0 else math.nan
    out["share_train"] = 1 - out["share_data"]
    out["share_data_ci_low"], out["share_data_ci_high"] = _percentile(share_data)
    out["share_train_ci_low"], out["share_train_ci_high"] = 1 - out["share_data_ci_high"], 1 - out["share_data_ci_low"]
    if not total > 0:
        notes.append("every component estimated at 0: no shares")
    out["note"] = "; ".join(notes)
    return out


def variance_components(
    runs: pd.DataFrame, metrics: pd.DataFrame, metric: str = "accuracy", split: str = "test",
    resamples: int | None = None,
) -> pd.DataFrame:
    """One row per (variance family, setting): see ``fit_variance_components`` and ``VARIANCE_COLUMNS``."""
    rows = []
    for family in families_of_kind(runs, VARIANCE_KIND):
        selected = _ok_rows(metrics, family, metric, split)
        for setting in dict.fromkeys(runs.loc[runs["family"] == family, "setting"]):
            values = selected[selected["setting"] == setting]
            fitted = fit_variance_components(values, resamples=resamples)
            rows.append({"family": family, "setting": setting, "metric": metric, "split": split, **fitted})
    return pd.DataFrame(rows).reindex(columns=VARIANCE_COLUMNS)


# ----------------------------------------------------------------------------------------------------
# Sweep: selection


def sweep_scores(runs: pd.DataFrame, metrics: pd.DataFrame, family: str) -> pd.DataFrame:
    """The sweep stage per configuration, best first: ``setting``, ``score`` (validation accuracy),
    ``tie_break`` (validation loss at the selected epoch), ``test``, ``n`` and ``sweep_rank`` (1 = winner).

    Configurations without a finished sweep run are left out. Only the sweep stage counts: re-runs never
    change the ranking (they are what the ranking is checked against).
    """
    family_runs = runs[(runs["family"] == family)]
    sweep_runs = family_runs[family_runs["sweep_stage"] != "rerun"]
    order = {s: i for i, s in enumerate(dict.fromkeys(sweep_runs["setting"]))}
    ids = set(sweep_runs["run_id"])

    def per_setting(metric: str, split: str, stage: str = "final", epochs: pd.DataFrame | None = None):
        rows = select_values(metrics, metric, split, stage)
        rows = rows[rows["run_id"].isin(ids)]
        if epochs is not None:
            rows = rows.merge(epochs, on=["run_id", "epoch"])
        return rows.groupby("setting")["value"]

    score = per_setting(SELECTION_METRIC, SELECTION_SPLIT)
    final = select_values(metrics, SELECTION_METRIC, SELECTION_SPLIT, "final")
    selected_epochs = final[final["run_id"].isin(ids)][["run_id", "epoch"]]
    table = pd.DataFrame({"score": score.mean(), "n": score.size()})
    table["tie_break"] = per_setting("loss", SELECTION_SPLIT, "epoch", selected_epochs).mean()
    table["test"] = per_setting(SELECTION_METRIC, "test").mean()
    table = table.reset_index().rename(columns={"index": "setting"})
    if table.empty:
        return table.assign(order=[], sweep_rank=[])
    table["order"] = table["setting"].map(order)
    table = table.sort_values(["score", "tie_break", "order"], ascending=[False, True, True], na_position="last")
    table["sweep_rank"] = np.arange(1, len(table) + 1)
    return table.reset_index(drop=True)


def select_sweep(runs: pd.DataFrame, metrics: pd.DataFrame, family: str, top_k: int) -> dict:
    """The selection the re-runs are made from: winner and top ``k`` configurations, with the ranking."""
    scores = sweep_scores(runs, metrics, family)
    family_runs = runs[(runs["family"] == family) & (runs["sweep_stage"] != "rerun")]
    failed = sorted(family_runs.loc[family_runs["status"] != "ok", "run_id"])
    selected = scores["setting"].head(top_k).tolist()
    return {
        "family": family,
        "metric": SELECTION_METRIC,
        "split": SELECTION_SPLIT,
        "tie_break": "lower validation loss at the selected epoch, then grid order",
        "top_k": int(top_k),
        "winner": selected[0] if selected else None,
        "selected": selected,
        "ranking": [
            {"setting": r.setting, "score": float(r.score), "tie_break": None if pd.isna(r.tie_break)
             else float(r.tie_break), "test": None if pd.isna(r.test) else float(r.test), "rank": int(r.sweep_rank)}
            for r in scores.itertuples()
        ],
        "failed_runs": failed,
    }


# ----------------------------------------------------------------------------------------------------
# Sweep: re-evaluation


def _p_best(values: dict[str, np.ndarray], resamples: int, seed: int) -> dict[str, float]:
    """Share of bootstrap resamples (within each configuration) in which each configuration's mean is highest."""
    names = [n for n, v in values.items() if len(v)]
    if not names:
        return {}
    rng = np.random.default_rng(seed)
    means = np.column_stack([
        values[n][rng.integers(0, len(values[n]), size=(resamples, len(values[n])))].mean(axis=1) for n in names
    ])
    # Ties (accuracies are multiples of 1/n_examples) share the win.
    best = np.isclose(means, means.max(axis=1, keepdims=True), rtol=0, atol=1e-12)
    wins = (best / best.sum(axis=1, keepdims=True)).mean(axis=0)
    return dict(zip(names, wins.tolist(), strict=True))


def _differ_p(reruns: pd.DataFrame) -> tuple[float, str]:
    """(p of the F test of configuration in ``value ~ C(setting) + C(block)`` over the re-runs, note).

    NaN with a note when the fit or the F test fails numerically (a singular design).
    """
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    frame = reruns[["value", "setting", "data_seed", "train_seed"]].copy()
    if frame["setting"].nunique() < 2:
        return math.nan, ""
    frame["block"] = frame["data_seed"].astype(str) + "/" + frame["train_seed"].astype(str)
    n_blocks = frame["block"].nunique()
    formula = "value ~ C(setting) + C(block)"
    if len(frame) - frame["setting"].nunique() - n_blocks + 1 < 1:
        formula = "value ~ C(setting)"  # no degrees of freedom left for blocks
    if len(frame) - frame["setting"].nunique() < 1 or frame["value"].std() == 0:
        return math.nan, ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = anova_lm(smf.ols(formula, frame).fit(), typ=2)
    except NUMERICAL_ERRORS as error:
        return math.nan, f"F test of configuration failed ({type(error).__name__}: {error})"
    p = float(table.loc["C(setting)", "PR(>F)"])
    return p, "" if math.isfinite(p) else "F test of configuration undefined (singular design)"


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    """(least-squares slope of ``y`` on ``x``, note); NaN with a note when the fit is rank-deficient or fails."""
    try:
        with warnings.catch_warnings():
            # A rank warning means x is numerically constant: the slope would be noise, so treat it as failed.
            warnings.simplefilter("error", np.exceptions.RankWarning)
            return float(np.polyfit(x, y, 1)[0]), ""
    except (np.exceptions.RankWarning, *NUMERICAL_ERRORS) as error:
        return math.nan, f"slope not computable ({type(error).__name__})"


def sweep_tables(
    runs: pd.DataFrame, metrics: pd.DataFrame, resamples: int = P_BEST_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(``sweep_reeval``, ``sweep_summary``) of every sweep family; see the module docstring."""
    reeval_rows, summary_rows = [], []
    for family in families_of_kind(runs, SWEEP_KIND):
        scores = sweep_scores(runs, metrics, family)
        if scores.empty:
            continue
        winner = scores["setting"].iloc[0]
        rerun_ids = set(runs.loc[(runs["family"] == family) & (runs["sweep_stage"] == "rerun"), "run_id"])
        sweep_ids = set(runs.loc[(runs["family"] == family) & (runs["sweep_stage"] != "rerun"), "run_id"])
        for split in SWEEP_SPLITS:
            rows = _ok_rows(metrics, family, SELECTION_METRIC, split)
            sweep_value = rows[rows["run_id"].isin(sweep_ids)].groupby("setting")["value"].mean()
            reruns = rows[rows["run_id"].isin(rerun_ids)]
            values = {s: g["value"].to_numpy(float) for s, g in reruns.groupby("setting", sort=False)}
            p_best = _p_best(values, resamples, seed)
            rerun_means = pd.Series({s: v.mean() for s, v in values.items()}, dtype=float)
            rerun_rank = rerun_means.rank(ascending=False, method="min")
            family_rows = []
            for r in scores.itertuples():
                v = values.get(r.setting, np.array([]))
                low, high = _t_interval(v)
                score = float(sweep_value.get(r.setting, math.nan))
                mean = float(v.mean()) if len(v) else math.nan
                family_rows.append({
                    "family": family, "setting": r.setting, "split": split, "sweep_rank": int(r.sweep_rank),
                    "is_winner": r.setting == winner, "in_top_k": bool(len(v)), "sweep_score": score,
                    "n_rerun": len(v), "rerun_mean": mean,
                    "rerun_std": float(np.std(v, ddof=1)) if len(v) > 1 else math.nan,
                    "rerun_ci_low": low, "rerun_ci_high": high, "optimism": score - mean,
                    "optimism_ci_low": score - high, "optimism_ci_high": score - low,
                    "rerun_rank": float(rerun_rank.get(r.setting, math.nan)),
                    "p_best": p_best.get(r.setting, math.nan),
                })
            reeval_rows += family_rows
            summary_rows.append(_summary_row(family, split, family_rows, values, reruns, len(scores)))
    reeval = pd.DataFrame(reeval_rows).reindex(columns=REEVAL_COLUMNS)
    summary = pd.DataFrame(summary_rows).reindex(columns=SUMMARY_COLUMNS)
    return reeval, summary


def _summary_row(family: str, split: str, rows: list[dict], values: dict, reruns: pd.DataFrame,
                 n_configs: int) -> dict:
    top = [r for r in rows if r["in_top_k"]]
    win = rows[0]
    out = {"family": family, "split": split, "n_configs": n_configs, "top_k": len(top),
           "n_reruns": int(sum(r["n_rerun"] for r in top)), "winner": win["setting"],
           "winner_sweep_score": win["sweep_score"], "winner_rerun_mean": win["rerun_mean"],
           "winner_rerun_ci_low": win["rerun_ci_low"], "winner_rerun_ci_high": win["rerun_ci_high"],
           "optimism": win["optimism"], "optimism_ci_low": win["optimism_ci_low"],
           "optimism_ci_high": win["optimism_ci_high"], "p_winner_best": win["p_best"], "note": ""}
    if not top:
        return out
    best = max(top, key=lambda r: r["rerun_mean"])
    out["rerun_best"] = best["setting"]
    out["winner_still_best"] = bool(win["in_top_k"] and best["setting"] == win["setting"])
    sweep_mean = float(np.mean([r["sweep_score"] for r in top]))
    rerun_mean = float(np.mean([r["rerun_mean"] for r in top]))
    out.update(topk_sweep_mean=sweep_mean, topk_rerun_mean=rerun_mean, topk_optimism=sweep_mean - rerun_mean)
    # Mean of k re-run means: variance sum(s_c^2 / n_c) / k^2, t with the pooled degrees of freedom.
    arrays = [values[r["setting"]] for r in top]
    df = sum(len(a) - 1 for a in arrays)
    if df > 0 and all(len(a) > 1 for a in arrays):
        se = math.sqrt(sum(np.var(a, ddof=1) / len(a) for a in arrays)) / len(arrays)
        half = scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, df) * se
        out["topk_optimism_ci_low"] = out["topk_optimism"] - half
        out["topk_optimism_ci_high"] = out["topk_optimism"] + half
    x = np.array([r["sweep_score"] for r in top])
    y = np.array([r["rerun_mean"] for r in top])
    notes = []
    if len(top) >= 3 and np.ptp(x) > 0:
        out["slope"], note = _slope(x, y)
        notes.append(note)
    out["differ_p"], note = _differ_p(reruns[reruns["setting"].isin([r["setting"] for r in top])])
    notes.append(note)
    out["differ"] = bool(out["differ_p"] < ALPHA) if not math.isnan(out["differ_p"]) else False
    out["note"] = "; ".join(n for n in notes if n)
    return out


# ----------------------------------------------------------------------------------------------------
# Files


def with_seed_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``setting`` and ``sweep_stage`` (tables collected before they existed: each run its own
    setting, no sweep stage)."""
    frame = frame.copy()
    if "setting" not in frame.columns:
        frame["setting"] = frame["variant"]
    if "sweep_stage" not in frame.columns:
        frame["sweep_stage"] = ""
    return frame


def run_variance_stats(runs_path: str | Path, metrics_path: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write ``variance_components``, ``sweep_reeval`` and ``sweep_summary`` (parquet + CSV) to ``out_dir``.

    Always all three, empty with their columns when the study has no variance or sweep family, so the
    workflow's outputs do not depend on the config.
    """
    runs = with_seed_columns(pd.read_parquet(runs_path))
    metrics = with_seed_columns(pd.read_parquet(metrics_path))
    reeval, summary = sweep_tables(runs, metrics)
    tables = {"variance_components": variance_components(runs, metrics), "sweep_reeval": reeval,
              "sweep_summary": summary}
    out_dir = Path(out_dir)
    return write_named_tables(tables, out_dir)
