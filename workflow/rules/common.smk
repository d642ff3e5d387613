# Config validation (JSON schema with defaults), wildcard constraints and input functions.
import json
import os
import shlex
from pathlib import Path

from snakemake.utils import validate

from lora_bench.config import load_yaml
from lora_bench.run.record import labelled_from
from lora_bench.study import data_key, data_spec, resolve_base_from, study_from_dict

# Snakemake's YAML reader keeps the last of two equal keys (two variants of one name would silently be
# one); lora_bench's reader refuses them, naming the key and line.
configfiles = [(path, load_yaml(path)) for path in workflow.overwrite_configfiles or []]
# A study may start from another study file's base (lora_bench.study.resolve_base_from), named relative to the
# file that names it: resolved before validation, so everything below sees one plain study.
if "base_from" in config:
    naming = [path for path, raw in configfiles if "base_from" in (raw or {})]
    folder = Path(naming[-1]).resolve().parent if naming else Path("config").resolve()
    resolved = resolve_base_from(dict(config), folder, "snakemake config")
    config.clear()
    config.update(resolved)
validate(config, "../schemas/study.schema.yaml", set_default=True)
# The library resolves every run now, so a bad variant stops the workflow before any job starts.
STUDY = study_from_dict(config, source="snakemake config")
RESULTS = STUDY.results_dir
REPORT = STUDY.report_dir
# Training jobs fork from a warm worker that has torch and transformers imported (lora_bench.warm: CPU
# machines only; each job is still its own command and record). LORA_BENCH_WARM=0 turns it off.
os.environ.setdefault("LORA_BENCH_WARM", "1")


# What the study trains, by config key (lora_bench.study.config_key): one training job per distinct config.
TRAINED = STUDY.trained_configs()
# The data those trainings read, by data key (lora_bench.study.data_key): one preparation job per distinct data.
DATA_SPECS = STUDY.data_preparations(TRAINED)


wildcard_constraints:
    family=r"[A-Za-z0-9_]+",
    variant=r"[A-Za-z0-9_.+-]+",
    seed=r"\d+",
    key=r"[0-9a-f]{16}",
    data_key=r"[0-9a-f]{16}",
    round=r"\d+",


def run_record_paths():
    return [
        f"{RESULTS}/runs/{family}/{variant}/seed{seed}.json"
        for family, variant, seed in STUDY.runs()
    ]


def record_path(family, variant, seed):
    return f"{RESULTS}/runs/{family}/{variant}/seed{seed}.json"


def sweep_stage_record_paths(wildcards):
    """The records a sweep's selection is made from: every configuration x sweep seed."""
    family = STUDY.families[wildcards.family]
    return [
        record_path(family.name, v, s) for v in family.variants for s in family.seeds
    ]


def rerun_record_paths(wildcards=None):
    """Re-runs of every sweep's selected configurations: known only once its select_sweep checkpoint ran.

    An input function of its own, beside the static inputs: until the checkpoint has run, Snakemake stands
    its output in for this function's files only, so the rest of the DAG stays planned.
    """
    paths = []
    for family in STUDY.sweep_families():
        selection = checkpoints.select_sweep.get(family=family).output[0]
        with open(selection) as handle:
            configs = json.load(handle)["selected"]
        paths += [record_path(*run) for run in STUDY.rerun_runs(family, configs)]
    return paths


def trained_record(wildcards):
    """The training job's record that a run's labelled record is made from.

    A tuned family's runs use the value its select_tune checkpoint chose: known only once tuning ran.
    """
    family, variant, seed = wildcards.family, wildcards.variant, int(wildcards.seed)
    value = None
    for selection in tuned_selection(wildcards):
        value = STUDY.tuned_value(family, variant, selection)
    return f"{RESULTS}/trained/{STUDY.run_key(family, variant, seed, value)}.json"


def stale_label_marker(wildcards):
    """A run's marker file, newer than its record when the record was made from another training than its
    config now gives (lora_bench.run.record.labelled_from), which makes the record be labelled again.

    Snakemake sees a changed input only through its .snakemake metadata, which a copied results folder or
    `--rerun-triggers mtime` lacks; and a missing input of a job whose output exists counts as an
    intermediate, not as a reason to run. An input newer than the record does make it run, so the marker is
    written here, when the DAG is built. It is every run's input, stale or not, and stays: an input that
    came and went would change the job's set of input files, which Snakemake's metadata takes as a reason to
    label the run once more on the next invocation. A new marker is dated at the epoch, older than any record.
    """
    marker = (
        f"{RESULTS}/stale/{wildcards.family}/{wildcards.variant}/seed{wildcards.seed}"
    )
    expected = os.path.basename(trained_record(wildcards))
    made_from = labelled_from(
        record_path(wildcards.family, wildcards.variant, wildcards.seed)
    )
    stale = made_from not in (None, expected)
    if stale or not os.path.exists(marker):
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as handle:
            if stale:
                handle.write(
                    f"labelled again: made from {made_from}; the config now gives {expected}\n"
                )
        if not stale:
            os.utime(marker, (0, 0))
    return marker


def round_paths(family, rounds):
    """The outputs of a tuned family's first ``rounds`` tune_round checkpoints (each read through ``get()``).

    Inputs, besides the records a job reads them for: a checkpoint whose output already exists is otherwise
    taken as it is by the jobs after it, even when this invocation makes it again (chained checkpoints,
    snakemake/snakemake#3862): the selection ran before the tie round it reads was made again, from the old one.
    As an input, the round is made first, and the reading job's inputs are worked out again once it is.
    """
    return [
        checkpoints.tune_round.get(family=family, round=r).output[0]
        for r in range(rounds)
    ]


def tried_tuning_records(family, rounds, ties=False):
    """The tuning records of a tuned family after ``rounds`` extension rounds (tune.extend): the base grid's,
    plus the values each round's selection (the tune_round checkpoint) asked for beyond a grid's end; with
    ``ties``, plus the tied values' runs on the tie seeds that the next round (the tie round) asked for.
    """
    selections = round_paths(family, rounds + (1 if ties else 0))
    ties_from = selections.pop() if ties else None
    return [
        record_path(*run)
        for run in STUDY.tuning_runs(family, selections, ties=ties_from)
    ]


def all_tuning_records(family):
    """Every tuning record a tuned family's final selection is made from: after every extension round and,
    with tune.tie_seeds, the tie round."""
    tune = STUDY.families[family].tune
    return tried_tuning_records(family, tune["extend"], ties=bool(tune["tie_seeds"]))


def tuning_round_records(wildcards):
    """The records round k's selection is made from: those of every round before it."""
    return tried_tuning_records(wildcards.family, int(wildcards.round))


def earlier_round_paths(wildcards):
    """The rounds before round k, which list the values (extensions) its records include (see round_paths)."""
    return round_paths(wildcards.family, int(wildcards.round))


def tuning_record_paths(wildcards):
    """The records a tuned family's final selection is made from: its tuning runs after every round."""
    return all_tuning_records(wildcards.family)


def all_round_paths(wildcards):
    """Every round of a tuned family, which the final selection's records are listed from (see round_paths)."""
    return round_paths(wildcards.family, STUDY.tune_rounds(wildcards.family))


def tuned_selection(wildcards):
    """A tuned family's selection.json (through the select_tune checkpoint), [] for other families: what
    trained_record reads, and an input of label_run for the reason round_paths gives, so runs wait for a
    selection this invocation makes again.
    """
    if not STUDY.families[wildcards.family].is_tuned:
        return []
    return [checkpoints.select_tune.get(family=wildcards.family).output[0]]


def tune_extension_record_paths(wildcards=None):
    """The tuning records beyond the base grids and tuning seeds that the extension and tie rounds asked for
    (none without tune.extend or tune.tie_seeds): known only once those rounds' checkpoints ran, hence an input
    function of its own.
    """
    static = set(run_record_paths())
    tried = [
        path for family in STUDY.tuned_families() for path in all_tuning_records(family)
    ]
    return [path for path in tried if path not in static]


def collected_record_paths(wildcards):
    """Every run record the tables are made from: the study's runs, sweep re-runs and tuning extensions."""
    return [
        *run_record_paths(),
        *rerun_record_paths(),
        *tune_extension_record_paths(),
    ]


def tune_json(wildcards):
    """The family's tune block with each variant's grid: a params value, so only a change of it re-selects
    (``extend`` and ``tie_seeds`` only when set, so that studies without them keep their parameters). The tie
    rules (tie_break, tie_margin) are labels of the tuning runs, which the selection reads (tuning.tie_rules).
    """
    tune = STUDY.families[wildcards.family].tune
    keys = ("key", "values", "factors", "grids", "seeds", "metric")
    block = {k: tune[k] for k in keys if k in tune}
    for optional in ("extend", "tie_seeds"):
        if tune[optional]:
            block[optional] = tune[optional]
    return json.dumps(block, sort_keys=True)


def run_config_json(wildcards):
    """The resolved run config: a params value, so editing a variant re-runs only its jobs."""
    return json.dumps(TRAINED[wildcards.key], sort_keys=True)


def run_labels_json(wildcards):
    return json.dumps(
        STUDY.labels(wildcards.family, wildcards.variant, int(wildcards.seed)),
        sort_keys=True,
    )


def gpu_flag():
    return f"--gpu-ids {','.join(map(str, STUDY.gpu_ids))}" if STUDY.gpu_ids else ""


def data_spec_json(wildcards):
    return json.dumps([DATA_SPECS[wildcards.data_key]], sort_keys=True)


def prepared_data(wildcards):
    """The marker of the data a training reads (none for synthetic data), as ancient: preparing data again
    (e.g. after a change of the preparation command) must not re-train finished runs; a run re-trains when its
    own resolved config (params.cfg) changes."""
    spec = data_spec(TRAINED[wildcards.key])
    return [] if spec is None else ancient(f"{RESULTS}/data/{data_key(spec)}.done")


def converged_reference_tests():
    """The converged reference's tests table, when the study names one (committed, not built here)."""
    ref = STUDY.converged_reference
    return [f"{ref['tables']}/tests.parquet"] if ref else []


def converged_reference_flag():
    ref = STUDY.converged_reference
    if not ref:
        return ""
    return f"--reference-tables {shlex.quote(ref['tables'])} --reference-family {shlex.quote(ref['family'])}"


def figure_paths():
    return [f"{RESULTS}/figures/{family}.png" for family in STUDY.families]


def selection_paths():
    """Every checkpoint's output: each sweep's and tuned family's selection, each tune.extend round and the tie
    round (tune.tie_seeds).

    Targets themselves, because Snakemake puts a checkpoint in the DAG only when its output is missing or some
    target needs it: an existing selection read through ``checkpoints.<rule>.get()`` is otherwise taken as it is,
    and one made from fewer runs or another grid (tune.extend added, a tuning record re-trained) would never be
    made again. As a target, its new or newer inputs and changed parameters re-run it, and the runs derived from
    it wait for it.
    """
    paths = expand(rules.select_sweep.output[0], family=STUDY.sweep_families())
    for family in STUDY.tuned_families():
        rounds = range(STUDY.tune_rounds(family))
        paths += expand(rules.tune_round.output[0], family=family, round=rounds)
        paths += expand(rules.select_tune.output[0], family=family)
    return paths


def final_targets():
    # Run records are targets themselves: Snakemake would otherwise accept a deleted record as long as
    # the tables built from it are newer, and never re-train that run (sweep re-runs: rerun_record_paths).
    return [
        *run_record_paths(),
        *selection_paths(),
        f"{RESULTS}/tables/tests.parquet",
        *figure_paths(),
        f"{REPORT}/report.md",
        f"{REPORT}/report.html",
    ]
