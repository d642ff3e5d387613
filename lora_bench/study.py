"""A study: the shared base run plus experiment families, expanded into concrete runs.

The Snakemake workflow and the CLI both use this module, so "which runs exist and what exactly
each one does" has a single answer. Families are config blocks (see ``study.schema.yaml``); a
family's ``kind`` picks its analysis, figure and report section from ``KINDS`` (one ``KindSpec`` per kind), and
a family without a kind is analysed generically.

Two seeds make a run: the *data seed* (``data.split_seed``: the train/validation/test split and any
subsampling) and the *train seed* (``seed``: LoRA and head initialisation, data order, dropout). A family
with ``data_seeds`` crosses them: each variant ``v`` becomes ``v-data<d>`` per data seed, so run records
keep the path ``runs/{family}/{variant}/seed{seed}.json`` and families without ``data_seeds`` keep their
variant names and resolved configs (and so do not re-run).

A family of kind ``sweep`` runs its grid once per seed in ``seeds``; which configurations are then
re-run (the top ``k`` by validation accuracy, with fresh train and data seeds) depends on the results,
so those runs are not in ``runs()``: ``rerun_runs(family, configs)`` lists them once a selection exists
(the workflow's ``select_sweep`` checkpoint), and ``run_config`` resolves every possible re-run up front.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_bench.config import ConfigError, RunConfig, deep_merge, load_yaml, validate


@dataclass(frozen=True)
class KindSpec:
    """What a family kind means to the analysis and the report: one declarative entry per kind in ``KINDS``.

    The analysis (``lora_bench.analysis``) reads these flags instead of naming kinds, so adding a kind is one
    entry here plus its figure (``lora_bench.report.figures.FIGURES``) and report section
    (``lora_bench.report.sections.KIND_SECTIONS``), each of which may be the generic one.
    """

    name: str
    # May a config name this kind? ``tune`` families are made from a family's ``tune`` block, not configured.
    selectable: bool = True
    # Are its variants tested against the family's baseline (tests, seed power)? Variance and sweep families cross
    # data and train seeds (lora_bench.analysis.variance); tune families only choose a value for the family they tune.
    baseline_tests: bool = True
    # Is every epoch of a variant compared with epoch 1 of the same variant, instead of with the baseline?
    epoch_tests: bool = False
    # Are its per-epoch results summarised (``stage == "epoch"`` rows of the summary table)?
    epoch_summaries: bool = False
    # Does it measure cost only, so that it may evaluate no accuracy at all (no rows of NaN, no accuracy table)?
    cost_only: bool = False
    # Cost tests and the cost summary: the metrics compared beside the memory metric and step time (None: no cost
    # analysis).
    cost_metrics: tuple[str, ...] | None = None
    # Does the report show the generic table of cost changes against the baseline (time, memory)? In a rank/alpha
    # grid they are noise.
    cost_table: bool = False
    # Does the report show the accuracy table of its conditions (tune families show their own table instead)?
    accuracy_table: bool = True
    # Are its variants compared item by item (lora_bench.analysis.items)?
    item_level: bool = True
    # The runs-table column that names a condition: "setting" where variants are expanded per data seed.
    setting_column: str = "variant"
    # Is it reported under "How much to trust a single run" instead of in a family section of its own?
    trust: bool = False
    # Are the reference-B claims about instruction finetuning tested on it (lora_bench.analysis.claims)?
    reference_claims: bool = False


# What a memory_time family compares beside memory and step time, and what shipping and serving a LoRA variant costs
# (lora_bench.adapters.serving), compared in lora_variants families.
MEMORY_TIME_OTHER_METRICS = ("tokens_per_second", "base_weight_bytes")
SERVING_METRICS = ("adapter_bytes", "inference_overhead", "inference_latency_unmerged")

SWEEP_KIND, VARIANCE_KIND = "sweep", "variance"
# LoRA vs its variants (DoRA, LoRA+, other inits): accuracy and every cost, shipping and serving included.
LORA_VARIANTS_KIND = "lora_variants"
TUNE_KIND = "tune"
GENERIC_KIND = "generic"

# Every family kind, in config order; a family without ``kind`` whose name is a kind takes it, else "generic".
KINDS: dict[str, KindSpec] = {spec.name: spec for spec in (
    KindSpec("methods", cost_table=True),
    KindSpec("rank_alpha"),
    KindSpec("coverage", cost_table=True),
    KindSpec("epochs", epoch_tests=True, epoch_summaries=True, item_level=False),
    KindSpec("optimizer", cost_table=True),
    KindSpec("memory_time", cost_only=True, cost_metrics=MEMORY_TIME_OTHER_METRICS, cost_table=True,
             item_level=False),
    KindSpec(VARIANCE_KIND, baseline_tests=False, setting_column="setting", trust=True),
    KindSpec(SWEEP_KIND, baseline_tests=False, setting_column="setting", trust=True),
    KindSpec("instruct", epoch_summaries=True, reference_claims=True),
    KindSpec(LORA_VARIANTS_KIND, cost_metrics=SERVING_METRICS),
    KindSpec(GENERIC_KIND, cost_table=True),
    KindSpec(TUNE_KIND, selectable=False, baseline_tests=False, accuracy_table=False, item_level=False),
)}
# Kinds a config may name.
FAMILY_KINDS = tuple(name for name, spec in KINDS.items() if spec.selectable)


def kinds_where(predicate) -> tuple[str, ...]:
    """Names of the registered kinds whose ``KindSpec`` satisfies ``predicate``, in registry order."""
    return tuple(name for name, spec in KINDS.items() if predicate(spec))


def kind_spec(kind: str) -> KindSpec:
    """The registry entry of a kind; a kind the registry does not know (an old table) is analysed as generic."""
    return KINDS.get(kind, KINDS[GENERIC_KIND])


# What a variant may declare it is meant to show (`expect:`), so its flags are not read as a failed comparison.
EXPECTATIONS = ("no_learning",)


@dataclass(frozen=True)
class Family:
    name: str
    kind: str
    description: str
    baseline: str
    seeds: tuple[int, ...]
    variants: dict  # variant name -> partial run config (base and family base already merged)
    # Families with data_seeds and sweeps (their re-runs too): variant -> (setting = the variant before
    # expansion or the re-run's configuration, data seed).
    settings: dict = field(default_factory=dict)
    # Sweep families: the `sweep` block (top_k, rerun_seeds, rerun_data_seeds). ``rerun_variants``: the variants
    # that run only when a checkpoint asks for them, -> partial run config: a sweep's every possible re-run
    # (<config>-data<d>), a tuning family's every possible grid extension (tune.extend).
    sweep: dict | None = None
    rerun_variants: dict = field(default_factory=dict)
    # variant -> what its runs are expected to show (`expect: no_learning`): the report reads their flags so.
    expectations: dict = field(default_factory=dict)
    # Families with a `tune` block: key, values, seeds, metric and the name of the tuning family; in a tuning
    # family (kind tune): "of" = the family it tunes and "variant_values" = variant -> the value it runs.
    tune: dict | None = None

    @property
    def is_tuned(self) -> bool:
        """A family whose runs use the values its tuning family chose (not the tuning family itself)."""
        return bool(self.tune) and self.kind != TUNE_KIND


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
    # {tables, family}: the converged reference the report compares this study's differences with
    converged_reference: dict | None = None

    def runs(self) -> list[tuple[str, str, int]]:
        """Every (family, variant, seed) of the enabled families."""
        return [(f.name, v, s) for f in self.families.values() for v in f.variants for s in f.seeds]

    def run_config(self, family: str, variant: str, seed: int, tuned_value=None) -> RunConfig:
        """The resolved config of a run; ``tuned_value`` sets a tuned family's tune key (see ``run_key``)."""
        fam = self._family(family)
        if variant not in fam.variants and variant not in fam.rerun_variants:
            raise ConfigError(f"{self.source}: family {family!r} has no variant {variant!r}; "
                              f"it has {sorted(fam.variants)}")
        partial = fam.variants[variant] if variant in fam.variants else fam.rerun_variants[variant]
        if tuned_value is not None:
            if not fam.is_tuned:
                raise ConfigError(f"{self.source}: family {family!r} has no tune block")
            partial = _set_dotted(partial, fam.tune["key"], tuned_value)
        raw = deep_merge(partial, {"seed": seed})
        if self.threads and "threads" not in raw.get("train", {}):
            raw = deep_merge(raw, {"train": {"threads": self.threads}})
        return RunConfig.from_dict(raw, source=f"{self.source} [families.{family}.variants.{variant}]")

    def tuned_value(self, family: str, variant: str, selection_path: str | Path) -> float:
        """The value of its tune key that a tuned family's variant runs at, read from the family's selection.

        A named error when the selection chose a value that is not in the variant's current grid: the file was
        made for an earlier config (its grid since changed without Snakemake's metadata to notice, or an older
        file was restored); the message says how to select again (``--forcerun select_tune``).
        """
        grid = self.families[family].tune["grids"][variant]
        try:
            with open(selection_path, encoding="utf-8") as handle:
                value = json.load(handle)["chosen"][variant]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{selection_path}: no chosen value for variant {variant!r} of family {family!r} "
                              f"({exc}); run again with `--forcerun select_tune` to select again from the tuning "
                              "runs") from exc
        matched = _in_grid(value, grid)
        if matched is not None:
            return matched
        raise ConfigError(f"{selection_path}: family {family!r} variant {variant!r} was tuned to {value!r}, which is "
                          f"not in its current grid {grid}: the selection was made for an earlier config (Snakemake "
                          "re-selects on a grid change only through its .snakemake metadata). Run again with "
                          "`--forcerun select_tune`: the selection is made again from the tuning runs and the "
                          "family's runs follow it; no kept training is retrained")

    def run_key(self, family: str, variant: str, seed: int, tuned_value=None) -> str:
        """The name of what the run trains: see ``config_key``. Runs with the same key are trained once.

        ``tuned_value``: a tuned family's run with its tune key set to that value (the selected one).
        """
        return config_key(self.run_config(family, variant, seed, tuned_value).to_dict())

    def tuning_runs(self, family: str, rounds: list[str | Path] | tuple = (),
                    ties: str | Path | None = None) -> list[tuple[str, str, int]]:
        """The (tuning family, tuning variant, seed) runs a tuned family's selection is made from after the given
        extension rounds: its base grid, plus, per round, one value beyond the end of a variant's values tried so
        far where that round's selection chose that end (``chosen_edge``; see ``tune.extend`` in the schema).

        ``rounds``: the selection JSON files of rounds 0, 1, ... (each made from the runs of the rounds before).
        A round can add no value past the ``extend`` steps its grid was planned with (``tune["grids"]``), so
        every run named here has a config the workflow knows up front. ``ties``: the selection made after the
        last extension round (the tie round, ``tune_rounds``); every value it lists as tied at the top of its
        variant also runs on each of ``tune.tie_seeds``.
        """
        fam = self.families[family]
        tune = fam.tune
        tried = {variant: list(tune["base_grids"][variant]) for variant in fam.variants}
        for path in rounds:
            for variant, edge in _read_selection(path, "chosen_edge").items():
                if variant in tried and edge in ("low", "high"):
                    beyond = _next_beyond(tune["grids"][variant], tried[variant], edge)
                    if beyond is not None:
                        tried[variant].append(beyond)
        tuning = self.families[tune["family"]]
        runs = [(tuning.name, _tuning_variant(variant, tune["key"], value), seed)
                for variant, values in tried.items() for value in values for seed in tuning.seeds]
        if ties is not None:
            for variant, values in _read_selection(ties, "tied").items():
                # Only values this study has tried: a tie round made for an earlier config may name others.
                matched = [_in_grid(value, tried.get(variant, [])) for value in values]
                runs += [(tuning.name, _tuning_variant(variant, tune["key"], value), seed)
                         for value in matched if value is not None for seed in tune["tie_seeds"]]
        return runs

    def tune_rounds(self, family: str) -> int:
        """How many ``tune_round`` checkpoints a tuned family's selection waits for: one per ``tune.extend`` step,
        and, with ``tune.tie_seeds``, the tie round after them (its ``tied`` values run on the tie seeds)."""
        tune = self.families[family].tune
        return tune["extend"] + (1 if tune["tie_seeds"] else 0)

    def tuned_families(self) -> list[str]:
        """Families with a `tune` block (their runs wait for the selection of their tuning family)."""
        return [f.name for f in self.families.values() if f.is_tuned]

    def trained_configs(self) -> dict[str, dict]:
        """Key -> resolved config of every run the study may train: its runs and every possible sweep re-run.

        Several runs (families, variants) with one resolved config share one key, so one training job.
        """
        runs = self.runs() + [(f.name, v, s) for f in self.families.values() if f.sweep
                              for v in f.rerun_variants for s in f.sweep["rerun_seeds"]]
        # A tuning family's possible grid extensions, and a tuned family's runs with every value of its grid
        # (extensions included): which are run and which value is used is known only after tuning.
        runs += [(f.name, v, s) for f in self.families.values() if f.kind == TUNE_KIND
                 for v in f.rerun_variants for s in f.seeds]
        # ... and every value of its grid on the tie seeds (tune.tie_seeds): which values tie is known only then.
        runs += [(f.name, v, s) for f in self.families.values() if f.kind == TUNE_KIND
                 for v in [*f.variants, *f.rerun_variants] for s in f.tune["tie_seeds"]]
        runs += [(f.name, v, s, value) for f in map(self.families.get, self.tuned_families())
                 for v in f.variants for s in f.seeds for value in f.tune["grids"][v]]
        configs: dict[str, dict] = {}
        for run in runs:
            cfg = self.run_config(*run).to_dict()
            configs.setdefault(config_key(cfg), cfg)
        return configs

    def data_preparations(self, trained: dict[str, dict] | None = None) -> dict[str, dict]:
        """Data key -> spec (``data_spec``) of every distinct data the study's trainings read, sweep re-runs
        included: each is fetched and tokenized once, by its own workflow job.

        Only the spec, not the whole run config, decides whether data preparation re-runs: a new learning
        rate must not re-prepare data. Synthetic token ids are generated in the run itself.
        ``trained``: ``trained_configs()`` when the caller already has it (the workflow resolves every run once).
        """
        specs: dict[str, dict] = {}
        for resolved in (trained if trained is not None else self.trained_configs()).values():
            spec = data_spec(resolved)
            if spec is not None:
                specs.setdefault(data_key(spec), spec)
        return specs

    def labels(self, family: str, variant: str, seed: int) -> dict:
        fam = self._family(family)
        labels = {"family": family, "family_kind": fam.kind, "variant": variant, "seed": seed,
                  "is_baseline": variant == fam.baseline, "study": self.name}
        # Only families that cross seeds get the extra labels: the labels are a workflow parameter, and a
        # changed parameter would re-run every finished run of the older families.
        expected = fam.expectations.get(fam.settings.get(variant, (variant,))[0])
        if expected:  # only then: a new label on every run would re-label them all
            labels["expect"] = expected
        if fam.kind == TUNE_KIND:
            labels.update(setting=fam.settings[variant][0], tunes=fam.tune["of"], tune_key=fam.tune["key"],
                          tune_value=fam.tune["variant_values"][variant], tune_metric=fam.tune["metric"],
                          tune_tie_break=fam.tune["tie_break"])
            if fam.tune["tie_margin"]:  # only then: studies without it keep their labels
                labels["tune_tie_margin"] = fam.tune["tie_margin"]
            if variant in fam.rerun_variants:  # only then: the base grid's runs keep the labels they had
                labels["tune_extension"] = True
            if seed in fam.tune["tie_seeds"]:  # likewise
                labels["tune_tie_seed"] = True
        elif variant in fam.settings:
            setting, data_seed = fam.settings[variant]
            labels.update(setting=setting, data_seed=data_seed, train_seed=seed)
            if fam.kind == SWEEP_KIND:
                labels["sweep_stage"] = "sweep" if variant in fam.variants else "rerun"
        return labels

    def sweep_families(self) -> list[str]:
        return [f.name for f in self.families.values() if f.kind == SWEEP_KIND]

    def rerun_runs(self, family: str, configs: list[str]) -> list[tuple[str, str, int]]:
        """The re-runs of the selected sweep ``configs``: every rerun data seed x rerun train seed."""
        fam = self._family(family)
        if fam.sweep is None:
            raise ConfigError(f"{self.source}: family {family!r} is not a sweep (kind {fam.kind!r})")
        unknown = [c for c in configs if c not in fam.variants]
        if unknown:
            raise ConfigError(f"{self.source}: sweep {family!r} has no configuration(s) {unknown}")
        return [(family, data_variant(c, d), s) for c in configs for d in fam.sweep["rerun_data_seeds"]
                for s in fam.sweep["rerun_seeds"]]

    def _family(self, family: str) -> Family:
        if family not in self.families:
            raise ConfigError(f"{self.source}: unknown experiment family {family!r}; "
                              f"the study has {sorted(self.families)}")
        return self.families[family]


# Train settings that never change a run's numbers: runs that differ only in these are the same run.
NUMBER_NEUTRAL_TRAIN_KEYS = ("progress", "checkpoint")


def data_spec(resolved: dict) -> dict | None:
    """What a run's prepared (fetched, tokenized) data depends on, as a partial run config: its data and model
    (the tokenizer), and for instruction data the task and prompt settings too; None for synthetic data."""
    if resolved["data"]["source"] == "synthetic":
        return None
    spec = {"data": resolved["data"], "model": resolved["model"]}
    if "task" in resolved:
        spec.update(task=resolved["task"], instruct=resolved["instruct"])
    return spec


def data_key(spec: dict) -> str:
    """16 hex digits naming a data spec: the workflow's preparation job and marker of that data.

    One marker per spec, not one for the whole study: a study that gains a family on new data then prepares
    only that data, and no existing marker is rewritten. (A single study-wide marker had to be re-made whenever
    the study's data changed, and Snakemake 9 then ran only that preparation and reported the study done,
    leaving every new run for a second invocation: snakemake/snakemake#4166.)
    """
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_key(resolved: dict) -> str:
    """16 hex digits naming a resolved run config (labels are not part of it): equal configs, equal keys.

    The training job of a run is named by this key, so renaming a family or variant, or listing the same
    config in two families (the methods baseline is also the rank/alpha and coverage baseline), trains nothing
    again; each family still gets its own labelled record of the run.
    """
    train = {k: v for k, v in resolved.get("train", {}).items() if k not in NUMBER_NEUTRAL_TRAIN_KEYS}
    text = json.dumps({**resolved, "train": train}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_variant(variant: str, data_seed: int) -> str:
    """Name of a variant on data seed ``data_seed`` (families with ``data_seeds``, a sweep's re-runs)."""
    return f"{variant}-data{data_seed}"


def _with_data_seed(partial: dict, data_seed: int) -> dict:
    return deep_merge(partial, {"data": {"split_seed": data_seed}})


def _base_data_seed(partial: dict) -> int:
    # The run schema's default split seed when neither the base nor the variant sets one.
    return int((partial.get("data") or {}).get("split_seed", 0))


def _cross_seeds(where: str, kind: str, block: dict, variants: dict, baseline: str, seeds: tuple[int, ...]):
    """Expand a family's variants over its data seeds and set up a sweep's re-runs.

    Returns (variants, baseline, settings, sweep, rerun_variants).
    """
    data_seeds = block.get("data_seeds")
    sweep = block.get("sweep")
    if sweep is not None and kind != SWEEP_KIND:
        raise ConfigError(f"{where}: `sweep` is only allowed in families of kind {SWEEP_KIND!r} (this one is {kind!r})")
    if kind == SWEEP_KIND:
        if sweep is None:
            raise ConfigError(f"{where}: a family of kind {SWEEP_KIND!r} needs a `sweep` block "
                              "(top_k, rerun_seeds, rerun_data_seeds)")
        if data_seeds:
            raise ConfigError(f"{where}: a sweep runs on the base data seed; give its re-runs' data seeds in "
                              "sweep.rerun_data_seeds, not data_seeds")
        if sweep["top_k"] > len(variants):
            raise ConfigError(f"{where}: sweep.top_k = {sweep['top_k']} but the sweep has only {len(variants)} "
                              "configuration(s)")
        reused = sorted(set(sweep["rerun_seeds"]) & set(seeds))
        if reused:
            raise ConfigError(f"{where}: sweep.rerun_seeds {reused} are also sweep seeds; re-runs need fresh seeds")
        settings, reruns = {}, {}
        for name, partial in variants.items():
            base_seed = _base_data_seed(partial)
            if base_seed in sweep["rerun_data_seeds"]:
                raise ConfigError(f"{where}: sweep.rerun_data_seeds contains {base_seed}, the data seed the sweep "
                                  f"itself runs on (variant {name!r}); re-runs need fresh data seeds")
            settings[name] = (name, base_seed)
            for d in sweep["rerun_data_seeds"]:
                reruns[data_variant(name, d)] = _with_data_seed(partial, d)
                settings[data_variant(name, d)] = (name, d)
        return variants, baseline, settings, dict(sweep), reruns
    if kind == VARIANCE_KIND and (not data_seeds or len(data_seeds) < 2 or len(seeds) < 2):
        raise ConfigError(f"{where}: a family of kind {VARIANCE_KIND!r} needs at least two data_seeds and two "
                          "seeds, or the two sources of variance cannot be told apart")
    if not data_seeds:
        return variants, baseline, {}, None, {}
    expanded, settings = {}, {}
    for name, partial in variants.items():
        for d in data_seeds:
            expanded[data_variant(name, d)] = _with_data_seed(partial, d)
            settings[data_variant(name, d)] = (name, d)
    return expanded, data_variant(baseline, data_seeds[0]), settings, None, {}


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


# Variant names become folder names and a Snakemake wildcard: the pattern of study.schema.yaml.
# fullmatch, not the schema's ``$``, which Python also matches before a final newline.
VARIANT_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
FAMILY_NAME = re.compile(r"[A-Za-z0-9_]+")


def _grid_variants(grid: dict, where: str = "") -> dict[str, dict]:
    keys = list(grid)
    variants = {}
    for values in itertools.product(*(grid[k] for k in keys)):
        name = "-".join(f"{k.rsplit('.', 1)[-1]}{_format_value(v)}" for k, v in zip(keys, values))
        if not VARIANT_NAME.fullmatch(name):
            raise ConfigError(f"{where}: grid value(s) {list(values)} give the variant name {name!r}, which is not "
                              "a folder name of letters, digits and _.+-; list such variants by name instead")
        if name in variants:
            raise ConfigError(f"{where}: grid values give the variant name {name!r} twice (e.g. 8 and 8.0, or two "
                              "keys ending in the same word); list such variants by name instead")
        overrides: dict = {}
        for key, value in zip(keys, values):
            overrides = _set_dotted(overrides, key, value)
        variants[name] = overrides
    return variants


def _tune_families(family: Family, tune: dict, source: str, families: dict) -> tuple[Family, Family]:
    """The tuned family (its runs use the selected value) and its tuning family ``<name>_tune``.

    Every variant runs every value of the grid once per tuning seed, on validation only (``train.evaluate_test``
    false: the test split is not evaluated, so it cannot leak into the choice), with the same epochs and steps
    as the comparison: an equal budget per variant.
    """
    where = f"{source} [families.{family.name}.tune]"
    name = f"{family.name}_tune"
    if family.kind in (SWEEP_KIND, VARIANCE_KIND) or family.settings:
        raise ConfigError(f"{where}: tuning is for families that compare variants on one data split, not "
                          f"{family.kind} families or families with data_seeds")
    if name in families:
        raise ConfigError(f"{where}: the tuning family would be named {name!r}, which the study already uses")
    seeds = tuple(tune["seeds"])
    reused = sorted(set(seeds) & set(family.seeds))
    if reused:
        raise ConfigError(f"{where}: tune.seeds {reused} are also the family's seeds; tuning needs fresh seeds")
    tie_seeds = tuple(tune.get("tie_seeds") or ())
    reused = sorted(set(tie_seeds) & (set(seeds) | set(family.seeds)))
    if reused:
        raise ConfigError(f"{where}: tune.tie_seeds {reused} are also tune.seeds or the family's seeds; a tie is "
                          "decided on fresh seeds")
    extend = int(tune.get("extend") or 0)
    base_grids = {variant: _tune_grid(tune, partial, f"{where} [variant {variant}]")
                  for variant, partial in family.variants.items()}
    extensions = {variant: _tune_extensions(grid, extend, f"{where} [variant {variant}]")
                  for variant, grid in base_grids.items()}
    # Every value a variant may run: the base grid first (its order kept, so a study without `extend` keeps
    # the grids, hence the workflow parameters, it always had), then the possible extensions.
    grids = {variant: [*grid, *extensions[variant]] for variant, grid in base_grids.items()}
    variants, extension_variants, settings, values = {}, {}, {}, {}
    for variant, partial in family.variants.items():
        for value in grids[variant]:
            tuning_variant = _tuning_variant(variant, tune["key"], value)
            into = variants if value in base_grids[variant] else extension_variants
            into[tuning_variant] = deep_merge(_set_dotted(partial, tune["key"], value),
                                              {"train": {"evaluate_test": False}})
            settings[tuning_variant] = (variant, _base_data_seed(partial))
            values[tuning_variant] = value
    baseline = _tuning_variant(family.baseline, tune["key"], grids[family.baseline][0])
    tuning = Family(name, TUNE_KIND, f"Tuning of {tune['key']} for family {family.name} (validation only).",
                    baseline, seeds, variants, settings, rerun_variants=extension_variants,
                    tune={**tune, "tie_seeds": list(tie_seeds), "of": family.name, "variant_values": values})
    tuned = Family(family.name, family.kind, family.description, family.baseline, family.seeds, family.variants,
                   family.settings, family.sweep, family.rerun_variants, family.expectations,
                   tune={**tune, "extend": extend, "tie_seeds": list(tie_seeds), "family": name, "grids": grids,
                         "base_grids": base_grids})
    return tuned, tuning


def _tuning_variant(variant: str, key: str, value) -> str:
    """The tuning family's variant that runs ``variant`` at ``value`` of the tuned key, e.g. lora-lr0.0003."""
    return f"{variant}-{key.rsplit('.', 1)[-1]}{_format_value(value)}"


def _tune_extensions(grid: list[float], extend: int, where: str) -> list[float]:
    """The values ``tune.extend`` may add beyond each end of a variant's grid: up to ``extend`` geometric steps
    below its smallest and above its largest value, each step the ratio of the grid's two values at that end
    (a 0.3 / 1 / 3 grid goes on to 0.09 and 9). Geometric, because the keys tuned this way (learning rates)
    act on a log scale; 3 significant digits, so that a 0.1 ... 10 grid's 1/3 step reads 0.00167 in run names,
    not 0.00166666666667."""
    if not extend:
        return []
    ordered = sorted(grid)
    if len(ordered) < 2 or ordered[0] <= 0:
        raise ConfigError(f"{where}: tune.extend steps geometrically beyond the grid's ends, so it needs at least "
                          f"two positive values; the grid is {grid}")
    low_step, high_step = ordered[0] / ordered[1], ordered[-1] / ordered[-2]
    lows = [float(f"{ordered[0] * low_step ** k:.3g}") for k in range(1, extend + 1)]
    highs = [float(f"{ordered[-1] * high_step ** k:.3g}") for k in range(1, extend + 1)]
    downwards, upwards = [ordered[0], *lows], [ordered[-1], *highs]
    if downwards != sorted(set(downwards), reverse=True) or upwards != sorted(set(upwards)):
        raise ConfigError(f"{where}: tune.extend's steps beyond the grid {grid} round to values it already has "
                          f"({lows} below, {highs} above, at 3 significant digits); space its ends further apart")
    return [*lows, *highs]


def _read_selection(path: str | Path, field_name: str) -> dict:
    """``field_name`` of a tuning round's selection JSON; a named error saying how to make it again otherwise."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)[field_name]
        if not isinstance(value, dict):
            raise TypeError(f"{field_name} is a {type(value).__name__}, not a mapping")
        return value
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a tuning selection with {field_name} ({exc}); run again with "
                          "`--forcerun tune_round` to select again from the tuning runs") from exc


def _in_grid(value, grid: list[float]) -> float | None:
    """The value of ``grid`` equal to ``value`` up to a JSON round trip (None if there is none)."""
    if isinstance(value, (int, float)):
        for candidate in grid:
            if abs(value - candidate) <= 1e-9 * abs(candidate):
                return candidate
    return None


def _next_beyond(grid: list[float], tried: list[float], edge: str) -> float | None:
    """The value of ``grid`` next beyond the ``edge`` ("low" / "high") end of ``tried``; None when none is left."""
    if edge == "high":
        beyond = [v for v in grid if v > max(tried)]
        return min(beyond) if beyond else None
    beyond = [v for v in grid if v < min(tried)]
    return max(beyond) if beyond else None


def _tune_grid(tune: dict, partial: dict, where: str) -> list[float]:
    """A variant's values of the tuned key: ``values`` as given, or ``factors`` times the variant's own value
    (each method keeps its own scale, e.g. a full-finetuning rate 20x below LoRA's, with the same budget)."""
    if ("values" in tune) == ("factors" in tune):
        raise ConfigError(f"{where}: give tune.values (absolute) or tune.factors (times the variant's value), not "
                          "both or neither")
    if "values" in tune:
        return [float(v) for v in tune["values"]]
    node = RunConfig.from_dict(partial, source=where).to_dict()
    for part in tune["key"].split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{where}: tune.key {tune['key']!r} is not a run-config key")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise ConfigError(f"{where}: tune.factors need a numeric {tune['key']}, got {node!r}")
    # 12 significant digits: 1e-3 x 0.3 is 3e-4 in names and configs, not 0.00030000000000000003.
    return [float(f"{node * f:.12g}") for f in tune["factors"]]


def _gpu_ids(value, source: str = "<dict>") -> tuple[int, ...]:
    ids = tuple(int(part) for part in value.split(",")) if isinstance(value, str) else tuple(value)
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{source}: gpu_ids {value!r} names a GPU twice")
    return ids


def resolve_base_from(raw: dict, folder: str | Path, source: str = "<dict>", _seen: tuple = ()) -> dict:
    """The study with its ``base_from`` resolved: that study file's ``base`` (followed through its own
    ``base_from``), with this study's ``base`` merged over it, and ``base_from`` removed.

    Why: a study that runs new families on another study's base run should name that base, not copy it, so
    the two cannot drift apart unnoticed. Only ``base`` is inherited: families, seeds and folders stay each
    study's own. The path is relative to the folder of the file that names it.
    """
    if not isinstance(raw, dict) or "base_from" not in raw:
        return raw
    reference = raw["base_from"]
    if not isinstance(reference, str) or not reference:
        raise ConfigError(f"{source}: base_from must be the path of a study file, got {reference!r}")
    parent_path = (Path(folder) / reference).resolve()
    if parent_path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, parent_path))
        raise ConfigError(f"{source}: base_from forms a cycle: {chain}")
    if not parent_path.is_file():
        raise ConfigError(f"{source}: base_from {reference!r} does not exist (looked for {parent_path})")
    parent = resolve_base_from(load_yaml(parent_path), parent_path.parent, str(parent_path), (*_seen, parent_path))
    if not isinstance(parent, dict) or not isinstance(parent.get("base"), dict):
        raise ConfigError(f"{source}: base_from {reference!r} has no `base` block to start from")
    resolved = {key: value for key, value in raw.items() if key != "base_from"}
    resolved["base"] = deep_merge(parent["base"], raw.get("base") or {})
    return resolved


def load_study_config(path: str | Path) -> dict:
    """A study file as a dict, its ``base_from`` resolved (see ``resolve_base_from``)."""
    path = Path(path)
    return resolve_base_from(load_yaml(path), path.resolve().parent, str(path), (path.resolve(),))


def study_from_dict(raw: dict, source: str = "<dict>") -> Study:
    if isinstance(raw, dict) and "base_from" in raw:
        # Relative to its file, which a dict does not know: load_study_config resolves it.
        raise ConfigError(f"{source}: base_from is not resolved; load the study with load_study_config")
    cfg = validate(raw, "study", source)
    if "seed" in cfg["base"]:
        raise ConfigError(f"{source}: base.seed is not allowed; seeds come from the `seeds` list")
    families = {}
    for name, block in cfg["families"].items():
        if not block["enabled"]:
            continue
        where = f"{source} [families.{name}]"
        bad = [v for v in block["variants"] if not VARIANT_NAME.fullmatch(v)]
        if not FAMILY_NAME.fullmatch(name) or bad:
            raise ConfigError(f"{where}: name {(bad or [name])[0]!r} is not a folder name of letters, digits and _ "
                              "(and .+- for variants)")
        explicit = {v: dict(o or {}) for v, o in block["variants"].items()}
        expectations = {v: o.pop("expect") for v, o in explicit.items() if "expect" in o}
        wrong = {v: e for v, e in expectations.items() if e not in EXPECTATIONS}
        if wrong:
            raise ConfigError(f"{where}: expect {wrong} is not one of {list(EXPECTATIONS)}")
        generated = _grid_variants(block["grid"], where) if block["grid"] else {}
        clash = set(explicit) & set(generated)
        if clash:
            raise ConfigError(f"{where}: variant name(s) {sorted(clash)} are both listed and generated by grid")
        variants_raw = {**explicit, **generated}
        if not variants_raw:
            raise ConfigError(f"{where}: the family has no variants (give `variants` or `grid`)")
        if block["baseline"] not in variants_raw:
            raise ConfigError(f"{where}: baseline {block['baseline']!r} is not one of its variants "
                              f"{sorted(variants_raw)}")
        seeded = [v for v, o in variants_raw.items() if "seed" in o] + (["base"] if "seed" in block["base"] else [])
        if seeded:
            # The run's seed replaces it silently otherwise: a variant would not run with the seed it names.
            raise ConfigError(f"{where}: seed is set in {sorted(seeded)}; seeds come from the `seeds` list")
        family_base = deep_merge(cfg["base"], block["base"])
        variants = {v: deep_merge(family_base, o) for v, o in variants_raw.items()}
        kind = block.get("kind") or (name if name in FAMILY_KINDS else GENERIC_KIND)
        if kind not in FAMILY_KINDS:
            raise ConfigError(f"{where}: unknown kind {kind!r}; choose one of {list(FAMILY_KINDS)}")
        seeds = tuple(block.get("seeds") or cfg["seeds"])
        variants, baseline, settings, sweep, reruns = _cross_seeds(where, kind, block, variants, block["baseline"],
                                                                   seeds)
        families[name] = Family(name, kind, block["description"], baseline, seeds, variants, settings, sweep, reruns,
                                expectations)
    if not families:
        raise ConfigError(f"{source}: every family is disabled")
    for name in [n for n, f in families.items() if cfg["families"][n].get("tune")]:
        tuned, tuning = _tune_families(families[name], cfg["families"][name]["tune"], source, families)
        families[name], families[tuning.name] = tuned, tuning
    study = Study(cfg["name"], tuple(cfg["seeds"]), cfg["threads"], cfg["gpus_per_job"], families, source,
                  cfg["results_dir"], cfg["report_dir"], _gpu_ids(cfg["gpu_ids"], source),
                  cfg.get("converged_reference"))
    # Resolve every run now: a typo in one variant should stop the study before any training.
    for family in families.values():
        for variant in family.variants:
            study.run_config(family.name, variant, family.seeds[0])
        for variant in itertools.islice(family.rerun_variants, 1):
            study.run_config(family.name, variant, (family.sweep["rerun_seeds"] if family.sweep else family.seeds)[0])
    return study


def load_study(path: str | Path) -> Study:
    return study_from_dict(load_study_config(path), source=str(path))
