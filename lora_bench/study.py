"""A study: the shared base run plus experiment families, expanded into concrete runs.

The Snakemake workflow and the CLI both use this module, so "which runs exist and what exactly
each one does" has a single answer. Families are config blocks (see ``study.schema.yaml``); a
family's ``kind`` picks its figure and analysis from ``FAMILY_KINDS``, and a family of an
unregistered kind still runs and is analysed generically, so adding one needs no code edit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, RunConfig, deep_merge, load_yaml, validate

# Kinds with a dedicated figure and report section; anything else is analysed as "generic".
FAMILY_KINDS = ("methods", "rank_alpha", "coverage", "epochs", "optimizer", "memory_time", "instruct", "generic")


@dataclass(frozen=True)
class Family:
    name: str
    kind: str
    description: str
    baseline: str
    seeds: tuple[int, ...]
    variants: dict  # variant name -> partial run config (base and family base already merged)


@dataclass(frozen=True)
class Study:
    name: str
    seeds: tuple[int, ...]
    threads: int
    gpus_per_job: int
    families: dict[str, Family]
    source: str
    results_dir: str = "results"
    report_dir: str = "paper"
    gpu_ids: tuple[int, ...] = ()

    def runs(self) -> list[tuple[str, str, int]]:
        """Every (family, variant, seed) of the enabled families."""
        return [(f.name, v, s) for f in self.families.values() for v in f.variants for s in f.seeds]

    def run_config(self, family: str, variant: str, seed: int) -> RunConfig:
        fam = self._family(family)
        if variant not in fam.variants:
            raise ConfigError(f"{self.source}: family {family!r} has no variant {variant!r}; "
                              f"it has {sorted(fam.variants)}")
        raw = deep_merge(fam.variants[variant], {"seed": seed})
        if self.threads and "threads" not in raw.get("train", {}):
            raw = deep_merge(raw, {"train": {"threads": self.threads}})
        return RunConfig.from_dict(raw, source=f"{self.source} [families.{family}.variants.{variant}]")

    def data_preparations(self) -> list[dict]:
        """The distinct (data, model) pairs whose data must be fetched and tokenized, as partial run configs.

        Only these, not the whole study, decide whether data preparation re-runs: a new learning
        rate must not re-prepare data. Synthetic token ids are generated in the run itself.
        """
        specs: list[dict] = []
        for family, variant, seed in self.runs():
            cfg = self.run_config(family, variant, seed).to_dict()
            spec = {"data": cfg["data"], "model": cfg["model"]}
            if "task" in cfg:  # instruction data depends on the prompt settings too
                spec.update(task=cfg["task"], instruct=cfg["instruct"])
            if cfg["data"]["source"] != "synthetic" and spec not in specs:
                specs.append(spec)
        return specs

    def labels(self, family: str, variant: str, seed: int) -> dict:
        fam = self._family(family)
        return {"family": family, "family_kind": fam.kind, "variant": variant, "seed": seed,
                "is_baseline": variant == fam.baseline, "study": self.name}

    def _family(self, family: str) -> Family:
        if family not in self.families:
            raise ConfigError(f"{self.source}: unknown experiment family {family!r}; "
                              f"the study has {sorted(self.families)}")
        return self.families[family]


def _set_dotted(mapping: dict, dotted: str, value) -> dict:
    node: dict = {}
    root = node
    parts = dotted.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return deep_merge(mapping, root)


def _format_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _grid_variants(grid: dict) -> dict[str, dict]:
    keys = list(grid)
    variants = {}
    for values in itertools.product(*(grid[k] for k in keys)):
        name = "-".join(f"{k.rsplit('.', 1)[-1]}{_format_value(v)}" for k, v in zip(keys, values))
        overrides: dict = {}
        for key, value in zip(keys, values):
            overrides = _set_dotted(overrides, key, value)
        variants[name] = overrides
    return variants


def _gpu_ids(value) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(int(part) for part in value.split(","))
    return tuple(value)


def study_from_dict(raw: dict, source: str = "<dict>") -> Study:
    cfg = validate(raw, "study", source)
    if "seed" in cfg["base"]:
        raise ConfigError(f"{source}: base.seed is not allowed; seeds come from the `seeds` list")
    families = {}
    for name, block in cfg["families"].items():
        if not block["enabled"]:
            continue
        where = f"{source} [families.{name}]"
        explicit = {v: (o or {}) for v, o in block["variants"].items()}
        generated = _grid_variants(block["grid"]) if block["grid"] else {}
        clash = set(explicit) & set(generated)
        if clash:
            raise ConfigError(f"{where}: variant name(s) {sorted(clash)} are both listed and generated by grid")
        variants_raw = {**explicit, **generated}
        if not variants_raw:
            raise ConfigError(f"{where}: the family has no variants (give `variants` or `grid`)")
        if block["baseline"] not in variants_raw:
            raise ConfigError(f"{where}: baseline {block['baseline']!r} is not one of its variants "
                              f"{sorted(variants_raw)}")
        family_base = deep_merge(cfg["base"], block["base"])
        variants = {v: deep_merge(family_base, o) for v, o in variants_raw.items()}
        kind = block.get("kind") or (name if name in FAMILY_KINDS else "generic")
        if kind not in FAMILY_KINDS:
            raise ConfigError(f"{where}: unknown kind {kind!r}; choose one of {list(FAMILY_KINDS)}")
        families[name] = Family(name, kind, block["description"], block["baseline"],
                                tuple(block.get("seeds") or cfg["seeds"]), variants)
    if not families:
        raise ConfigError(f"{source}: every family is disabled")
    study = Study(cfg["name"], tuple(cfg["seeds"]), cfg["threads"], cfg["gpus_per_job"], families, source,
                  cfg["results_dir"], cfg["report_dir"], _gpu_ids(cfg["gpu_ids"]))
    # Resolve every run now: a typo in one variant should stop the study before any training.
    for family in families.values():
        for variant in family.variants:
            study.run_config(family.name, variant, family.seeds[0])
    return study


def load_study(path: str | Path) -> Study:
    return study_from_dict(load_yaml(path), source=str(path))
