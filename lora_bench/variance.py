"""How much to trust a single run: where the variance comes from, and the winner's curse of a sweep.

Tables in, tables out, like ``lora_bench.stats`` (which this module builds on). Two family kinds:

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

from lora_bench import stats

VARIANCE_KIND, SWEEP_KIND = "variance", "sweep"
SELECTION_METRIC, SELECTION_SPLIT = "accuracy", "validation"
SWEEP_SPLITS = ("validation", "test")
VC_RESAMPLES = 200
P_BEST_RESAMPLES = 4999

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
    "topk_optimism_ci_low", "topk_optimism_ci_high", "slope", "differ_p", "differ",
]


# ----------------------------------------------------------------------------------------------------
# Helpers


def _ok_rows(metrics: pd.DataFrame, family: str, metric: str, split: str, stage: str = "final") -> pd.DataFrame:
    rows = stats.select_values(metrics, metric, split, stage)
    return rows[rows["family"] == family]


def _t_interval(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, se = float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(n))
    half = scipy_stats.t.ppf(0.5 + stats.CONFIDENCE / 2, n - 1) * se
    return mean - half, mean + half


def _percentile(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return math.nan, math.nan
    tail = (1 - stats.CONFIDENCE) / 2 * 100
    return float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))


def families_of_kind(runs: pd.DataFrame, kind: str) -> list[str]:
    return [f for f in stats.family_order(runs) if (runs.loc[runs["family"] == f, "family_kind"] == kind).any()]


# ----------------------------------------------------------------------------------------------------
# Variance components


def _reml(frame: pd.DataFrame) -> tuple[float, float, float, float, bool]:
    """(mu, s2_data, s2_train, s2_residual, converged) of the crossed model, on ``frame['y']``."""
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


def fit_variance_components(
    values: pd.DataFrame, resamples: int | None = None, seed: int = stats.BOOTSTRAP_SEED
) -> dict:
    """REML variance components of ``value`` by ``data_seed`` x ``train_seed``, with bootstrap intervals.

    ``values`` has columns ``value``, ``data_seed`` and ``train_seed`` (one row per run). Returns standard
    deviations (in the unit of ``value``), shares of the total variance and their 95 % parametric
    bootstrap percentile intervals; see the module docstring for the model.
    """
    resamples = resamples or VC_RESAMPLES
    frame = values[["value", "data_seed", "train_seed"]].dropna().reset_index(drop=True)
    n_data, n_train = frame["data_seed"].nunique(), frame["train_seed"].nunique()
    out: dict = {"n_runs": len(frame), "n_data_seeds": n_data, "n_train_seeds": n_train,
                 "mean": float(frame["value"].mean()) if len(frame) else math.nan, "resamples": resamples,
                 "method": f"REML (statsmodels MixedLM), 95 % parametric bootstrap percentile intervals, "
                           f"{resamples} resamples", "note": ""}
    by_data = frame.groupby("data_seed")["value"]
    out["sd_between_data_means"] = float(by_data.mean().std(ddof=1)) if n_data > 1 else math.nan
    within = by_data.var(ddof=1).dropna()
    out["sd_within_data"] = float(math.sqrt(within.mean())) if len(within) else math.nan
    if n_data < 2 or n_train < 2 or len(frame) < 4:
        out["note"] = "needs at least two data seeds and two train seeds"
        return out
    # Fit on a standardised scale: accuracy variances of 1e-5 are awkward for the optimiser.
    center, scale = float(frame["value"].mean()), float(frame["value"].std(ddof=1))
    if not scale > 0:
        out.update(sd_data=0.0, sd_train=0.0, sd_residual=0.0, sd_total=0.0,
                   note="every run gave the same value: no variance to split")
        return out
    frame["y"] = (frame["value"] - center) / scale
    _, s2_data, s2_train, s2_resid, converged = _reml(frame)
    estimates = np.array([s2_data, s2_train, s2_resid])

    # Parametric bootstrap on the same design.
    rng = np.random.default_rng(seed)
    data_codes = frame["data_seed"].astype("category").cat.codes.to_numpy()
    train_codes = frame["train_seed"].astype("category").cat.codes.to_numpy()
    sims = np.full((resamples, 3), np.nan)
    sds = np.sqrt(np.maximum(estimates, 0))
    boot = frame[["data_seed", "train_seed"]].copy()
    for b in range(resamples):
        a = rng.normal(0, sds[0], n_data)[data_codes]
        t = rng.normal(0, sds[1], n_train)[train_codes]
        boot["y"] = a + t + rng.normal(0, sds[2], len(frame))
        try:
            sims[b] = _reml(boot)[1:4]
        except (np.linalg.LinAlgError, ValueError):
            continue
    sims = np.maximum(sims, 0)
    estimates = np.maximum(estimates, 0)
    total = estimates.sum()
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
    if not converged:
        out["note"] = "REML optimiser did not report convergence"
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
        rows = stats.select_values(metrics, metric, split, stage)
        rows = rows[rows["run_id"].isin(ids)]
        if epochs is not None:
            rows = rows.merge(epochs, on=["run_id", "epoch"])
        return rows.groupby("setting")["value"]

    score = per_setting(SELECTION_METRIC, SELECTION_SPLIT)
    final = stats.select_values(metrics, SELECTION_METRIC, SELECTION_SPLIT, "final")
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


def _differ_p(reruns: pd.DataFrame) -> float:
    """p of the F test of configuration in ``value ~ C(setting) + C(block)`` over the re-runs."""
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    frame = reruns[["value", "setting", "data_seed", "train_seed"]].copy()
    if frame["setting"].nunique() < 2:
        return math.nan
    frame["block"] = frame["data_seed"].astype(str) + "/" + frame["train_seed"].astype(str)
    n_blocks = frame["block"].nunique()
    formula = "value ~ C(setting) + C(block)"
    if len(frame) - frame["setting"].nunique() - n_blocks + 1 < 1:
        formula = "value ~ C(setting)"  # no degrees of freedom left for blocks
    if len(frame) - frame["setting"].nunique() < 1 or frame["value"].std() == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = anova_lm(smf.ols(formula, frame).fit(), typ=2)
    return float(table.loc["C(setting)", "PR(>F)"])


def sweep_tables(
    runs: pd.DataFrame, metrics: pd.DataFrame, resamples: int = P_BEST_RESAMPLES, seed: int = stats.BOOTSTRAP_SEED
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
           "optimism_ci_high": win["optimism_ci_high"], "p_winner_best": win["p_best"]}
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
        half = scipy_stats.t.ppf(0.5 + stats.CONFIDENCE / 2, df) * se
        out["topk_optimism_ci_low"] = out["topk_optimism"] - half
        out["topk_optimism_ci_high"] = out["topk_optimism"] + half
    x = np.array([r["sweep_score"] for r in top])
    y = np.array([r["rerun_mean"] for r in top])
    if len(top) >= 3 and np.ptp(x) > 0:
        out["slope"] = float(np.polyfit(x, y, 1)[0])
    out["differ_p"] = _differ_p(reruns[reruns["setting"].isin([r["setting"] for r in top])])
    out["differ"] = bool(out["differ_p"] < stats.ALPHA) if not math.isnan(out["differ_p"]) else False
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
    written = {}
    for name, table in tables.items():
        for suffix in (".parquet", ".csv"):
            stats.write_table_atomically(table, out_dir / f"{name}{suffix}")
        written[name] = out_dir / f"{name}.parquet"
    return written
