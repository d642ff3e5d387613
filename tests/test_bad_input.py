"""Bad input ends in a clear, named error before any training starts, never in a traceback from deep
inside a library: property tests (hypothesis) over run configs, studies, YAML files, command lines and
data files, explicit cases for each kind of broken data file, and records and tables of other versions.

Each property says: whatever the input, the outcome is success or ``ConfigError``/``DataError``
(``ValueError``s naming the file or key), or exit status 2 with a ``lora-bench: ...`` message. Example
counts come from the hypothesis profile in conftest.py (``HYPOTHESIS_PROFILE=thorough`` for more).
"""

from __future__ import annotations

import json
import math
import string

import pandas as pd
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lora_bench import SCHEMA_VERSION
from lora_bench.analysis.tables import check_tables
from lora_bench.cli import main
from lora_bench.config import ConfigError, RunConfig, load_schema, load_yaml
from lora_bench.run.data import DataError, load_examples, prepare_splits
from lora_bench.run.models import tiny_tokenizer
from lora_bench.run.record import RecordError, read_record
from lora_bench.study import VARIANT_NAME, study_from_dict

# ---------------------------------------------------------------------------------------------------
# Strategies


def _schema_paths(schema: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, sub in schema.get("properties", {}).items():
        paths.append(prefix + key)
        paths += _schema_paths(sub, f"{prefix}{key}.")
    return paths


RUN_PATHS = _schema_paths(load_schema("run"))
RUN_KEYS = sorted({p.rsplit(".", 1)[-1] for p in RUN_PATHS})

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["lora", "cpu", "query", "local", "1e-3", "", "x.csv"]))
keys = st.sampled_from(RUN_KEYS) | st.text(max_size=8) | st.integers(-3, 3) | st.booleans()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                      max_leaves=12)
names = st.sampled_from(["lora", "a", "rank8", "x y", "a/b", "ü", "a\n", "", "seed0", "1"]) | st.text(max_size=6)


def _set(config: dict, dotted: str, value) -> dict:
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return config


VALID_RUN = {"seed": 0, "model": {"source": "random", "name": "tiny-bert"},
             "data": {"source": "local", "name": "data.csv"}, "train": {"epochs": 1, "device": "cpu"}}


def _ok_or_config_error(build):
    try:
        return build()
    except ConfigError as exc:
        assert str(exc).strip(), "an empty error message"
        return None


# ---------------------------------------------------------------------------------------------------
# Configs


@given(st.dictionaries(keys, values, max_size=5))
def test_any_mapping_is_a_run_config_or_a_config_error(raw):
    _ok_or_config_error(lambda: RunConfig.from_dict(raw, source="fuzz.yaml"))


@given(st.lists(st.tuples(st.sampled_from(RUN_PATHS), values), min_size=1, max_size=3))
def test_a_valid_run_with_random_keys_set_to_random_values(changes):
    raw = json.loads(json.dumps(VALID_RUN))
    for path, value in changes:
        _set(raw, path, value)
    cfg = _ok_or_config_error(lambda: RunConfig.from_dict(raw, source="fuzz.yaml"))
    if cfg is not None:
        # What passes is usable: finite numbers, a seed numpy takes, fractions that sum to one.
        assert 0 <= cfg.seed < 2**32
        for value in (cfg.train.lr, cfg.train.weight_decay, cfg.method.lora.alpha, cfg.method.lora.dropout):
            assert math.isfinite(value)
        assert math.isclose(sum(cfg.data.split.values()), 1.0, abs_tol=1e-6)


family_blocks = st.fixed_dictionaries(
    {"baseline": names},
    optional={
        "variants": st.dictionaries(names, st.none() | st.just({}) | st.dictionaries(keys, values, max_size=2),
                                    max_size=3),
        "grid": st.dictionaries(st.sampled_from(["method.lora.rank", "method.lora.alpha", "train.lr", "data.name",
                                                 "seed", "train.epochs", "x.y"]) | st.text(max_size=6),
                                st.lists(scalars, max_size=3), max_size=2),
        "seeds": st.lists(st.integers(-1, 2**33), max_size=3),
        "enabled": st.booleans(),
        "kind": st.sampled_from(["methods", "generic", "nope"]),
        "base": st.dictionaries(keys, values, max_size=2),
    },
)


@given(st.dictionaries(names, family_blocks, max_size=3),
       st.lists(st.integers(-1, 2**33), max_size=3) | st.none(),
       st.sampled_from(["results", "", "{x}", "rés ultats", "a\nb"]))
def test_any_study_is_a_study_or_a_config_error(families, seeds, results_dir):
    raw = {"base": {"model": {"source": "random", "name": "tiny-bert"}}, "families": families,
           "results_dir": results_dir}
    if seeds is not None:
        raw["seeds"] = seeds
    study = _ok_or_config_error(lambda: study_from_dict(raw, source="fuzz.yaml"))
    if study is None:
        return
    # What passes can be run: every run has a folder-safe name and a resolved config, nothing is lost.
    runs = study.runs()
    assert len(runs) == sum(len(f.variants) * len(f.seeds) for f in study.families.values())
    assert len(set(runs)) == len(runs)
    for family, variant, seed in runs:
        assert VARIANT_NAME.fullmatch(variant) and 0 <= seed < 2**32
        assert study.run_config(family, variant, seed).seed == seed
    assert "{" not in study.results_dir and study.results_dir


def _write(tmp_path, name: str, data) -> str:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return str(path)


def _cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors: exit 2 with "usage: ... error: ..."
        code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and "error:" in err, err
        return code, err
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code == 2:
        assert err.startswith("lora-bench: "), err
    return code, err


@given(st.text(max_size=200) | st.builds(lambda d: yaml.safe_dump(d), st.dictionaries(keys, values, max_size=4)))
def test_any_yaml_file_validates_or_exits_2_with_a_message(tmp_path_factory, text):
    path = _write(tmp_path_factory.mktemp("yaml"), "study.yaml", text)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", path])
    assert code in (0, 2), err.getvalue()
    assert "Traceback" not in err.getvalue()
    if code == 2:
        assert err.getvalue().startswith("lora-bench: ") and path in err.getvalue()


def test_duplicate_variant_names_in_yaml_are_an_error(tmp_path, capsys):
    text = ("families:\n  methods:\n    baseline: lora\n    variants:\n      lora: {}\n"
            "      full: {method: {name: full}}\n      lora: {train: {lr: 0.1}}\n")
    path = _write(tmp_path, "study.yaml", text)
    with pytest.raises(ConfigError, match=r"duplicate key 'lora' \(first at line 5\)"):
        load_yaml(path)
    code, err = _cli(["validate", path], capsys)
    assert code == 2 and "duplicate key 'lora'" in err


def test_duplicate_keys_in_a_workflow_configfile_stop_snakemake(tmp_path):
    from reliability_helpers import mini_study, snakemake

    path = mini_study(tmp_path)
    path.write_text(path.read_text() + "seeds: [5]\n")
    result = snakemake(tmp_path, "-n", check=False)
    assert result.returncode != 0 and "duplicate key 'seeds'" in result.stdout + result.stderr


class TrainingStarted(Exception):
    """Raised instead of training: reaching it means the input passed every check."""


@given(st.lists(st.tuples(st.sampled_from(RUN_PATHS) | st.text(string.printable, max_size=12),
                          st.text(max_size=10) | st.sampled_from(["[", "{a: 1", "1e-3", "nan", ".inf", "-1",
                                                                  "!!python/object:os.system", "a: b: c"])),
                min_size=1, max_size=3),
       st.sampled_from(["{}", "[1]", "{bad", "null", '{"model": 3}']))
# A valid command line always runs, so the reached-training branch cannot go untested by chance.
@example(sets=[("seed", "3")], label="{}")
def test_any_command_line_fails_with_exit_2_before_training(tmp_path_factory, monkeypatch, capsys, sets, label):
    import lora_bench.run.train

    def refuse(cfg, *args, **kwargs):
        raise TrainingStarted

    monkeypatch.setattr(lora_bench.run.train, "run_training", refuse)
    out = tmp_path_factory.mktemp("cli") / "record.json"
    argv = ["train", "--out", str(out), "--label", label]
    for key, value in sets:
        argv.append(f"--set={key}={value}")
    code, err = _cli(argv, capsys)
    if code == 2:
        assert not out.exists(), "a refused run left a record"
    else:
        # Only a command line whose every part is valid gets as far as training.
        assert code == 0 and json.loads(out.read_text())["error"].startswith("TrainingStarted")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "train.lr=[1"], "not valid YAML"),
        (["--set", "train..lr=1"], "not a dotted key"),
        (["--set", "=1"], "not a dotted key"),
        (["--set", "train.lr=.nan"], "train.lr: nan is not a finite number"),
        (["--set", "seed=99999999999"], "greater than the maximum"),
        (["--set", "method.name=lorra"], "'lorra' is not a registered method"),
        (["--config-json", "[1]"], "--config-json: expected a JSON object"),
        (["--config-json", "{bad"], "--config-json: not valid JSON"),
        (["--label", "[1]"], "--label: expected a JSON object"),
    ],
)
def test_bad_command_lines_are_named(tmp_path, capsys, argv, message):
    out = tmp_path / "r.json"
    code, err = _cli(["train", *argv, "--out", str(out)], capsys)
    assert code == 2 and message in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# Data files

TOKENIZER = tiny_tokenizer()
GOOD_ROWS = "".join(f'"a fine sentence {i}",{i % 2}\n' for i in range(40))


def _load(path, **data):
    spec = RunConfig.from_dict({"data": {"source": "local", "name": str(path), "max_length": 16,
                                         "cache_dir": str(path.parent / "cache"), **data}}).data
    examples = load_examples(spec)
    splits, info = prepare_splits(spec, TOKENIZER, "tiny")
    assert len(examples.texts) == len(examples.labels) and min(examples.labels) >= 0
    assert sum(info["sizes"].values()) <= len(examples.texts)
    return examples


BAD_FILES = {
    "empty": ("data.csv", b"", "is empty"),
    "header only": ("data.csv", b"text,label\n", "has no rows"),
    "latin-1": ("data.csv", "text,label\ncaf\xe9 cr\xe8me,1\nb,0\n".encode("latin-1"), "not UTF-8 text"),
    "UTF-16": ("data.csv", "text,label\na,1\nb,0\n".encode("utf-16"), "is UTF-16"),
    "cut inside a character": ("data.csv", "text,label\nab,1\n\u00e9".encode()[:-1], "ends inside a multi-byte"),
    "binary junk": ("data.jsonl", bytes(range(256)) * 4, "NUL byte"),
    "junk parquet": ("data.parquet", b"PAR1 not really", "could not read"),
    "missing label column": ("data.csv", b"text,stars\na,1\nb,0\n", r"no column 'label'.*\['text', 'stars'\]"),
    "missing text column": ("data.jsonl", b'{"review": "a", "label": 1}\n', r"no column 'text'"),
    "one class only": ("data.csv", ("text,label\n" + "".join(f"t{i},1\n" for i in range(30))).encode(),
                       "single label value"),
    "class too small": ("data.csv", ("text,label\n" + "".join(f"t{i},1\n" for i in range(30)) + "u,0\n").encode(),
                        "too few to put at least one"),
    "unterminated quote": ("data.csv", b'text,label\n"open,1\nb,0\n', "EOF inside string"),
    "numbers as text": ("data.csv", ("text,label\n" + "".join(f"{i},{i % 2}\n" for i in range(30))).encode(),
                        "non-text 'text'"),
    "empty labels": ("data.csv", b"text,label\na,\nb,\n", "empty label"),
    "JSON not records": ("data.json", b"[1, 2, 3]", "no column 'label'"),
    "unsupported suffix": ("data.xlsx", b"PK\x03\x04", "unsupported file type"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_data_files_are_named_before_training(tmp_path, case):
    name, content, message = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        _load(path)
    assert str(path) in str(err.value) or "class" in str(err.value)


def test_bad_data_file_through_the_workflow_command_exits_2(tmp_path, capsys):
    path = tmp_path / "data.csv"
    path.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    spec = {"model": {"source": "random", "name": "tiny-bert"},
            "data": {"source": "local", "name": str(path), "cache_dir": str(tmp_path / "cache")}}
    code, err = _cli(["prepare-data", "--specs-json", json.dumps([spec])], capsys)
    assert code == 2 and "not UTF-8 text" in err and str(path) in err


def test_extra_columns_and_a_huge_row_are_fine(tmp_path):
    path = tmp_path / "data.csv"
    huge = "word " * 200_000  # 1 MB in one field: truncated to max_length tokens, not an error
    path.write_text("text,label,notes\n" + f'"{huge}",1,x\n' + GOOD_ROWS.replace("\n", ",y\n"), encoding="utf-8")
    assert len(_load(path).texts) == 41


cells = (st.text(max_size=20) | st.integers(-5, 5) | st.floats(allow_nan=True) | st.none() | st.booleans()
         | st.sampled_from(["good", "bad", "", " ", "\n", "\x00", "é", '"', ","]))


@given(st.lists(st.sampled_from(["text", "label", "other", "Text", ""]) | st.text(max_size=5), min_size=1,
                max_size=4, unique=True).flatmap(
           lambda cols: st.tuples(st.just(cols), st.lists(st.lists(cells, min_size=len(cols), max_size=len(cols)),
                                                          max_size=40))),
       st.sampled_from([".csv", ".tsv", ".jsonl", ".parquet"]))
@settings(max_examples=max(5, settings().max_examples // 2))
def test_any_table_loads_or_is_a_data_error(tmp_path_factory, table, suffix):
    columns, rows = table
    path = tmp_path_factory.mktemp("table") / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(columns, row))) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".parquet":
        # Every such table is writable (unique string column names, cells cast to str), so a failure to write
        # it is a failure of the test, not an input to skip.
        pd.DataFrame(rows, columns=columns).astype(str).to_parquet(path)
    else:
        import csv

        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writerow(columns)
            writer.writerows(rows)
    try:
        _load(path)
    except DataError as exc:
        assert str(exc).strip()


@given(st.binary(max_size=400), st.sampled_from([".csv", ".tsv", ".json", ".jsonl", ".parquet"]))
@settings(max_examples=max(5, settings().max_examples // 2))
def test_any_bytes_load_or_are_a_data_error(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"data{suffix}"
    path.write_bytes(content)
    try:
        _load(path)
    except DataError as exc:
        assert str(exc).strip()


# ---------------------------------------------------------------------------------------------------
# Records and tables of other versions


def _record(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"schema_version": 0, "status": "ok"}, "schema_version 0, written by an older lora-bench"),
        ({"schema_version": SCHEMA_VERSION + 1, "status": "ok"},
         f"schema_version {SCHEMA_VERSION + 1}, written by a newer"),
        ({"status": "ok"}, "has no schema_version"),
        ({"schema_version": "1", "status": "ok"}, "schema_version '1'"),
        ({"schema_version": SCHEMA_VERSION, "status": "running"}, "status 'running'"),
        ([1, 2], "not a JSON object"),
        ('{"schema_version": 1, "status": "o', "not JSON"),
        ("", "not JSON"),
    ],
    ids=["older", "newer", "unversioned", "version as text", "not finished", "a list", "half written", "empty"],
)
def test_records_of_other_versions_or_broken_are_refused_by_name(tmp_path, capsys, content, message):
    path = _record(tmp_path, "seed0.json", content)
    with pytest.raises(RecordError, match=message) as err:
        read_record(path)
    assert str(path) in str(err.value)
    code, stderr = _cli(["collect", "--records", str(path), "--out-dir", str(tmp_path / "tables")], capsys)
    assert code == 2 and str(path) in stderr


@pytest.mark.parametrize(("version", "message"), [(0, "written by an older"), (SCHEMA_VERSION + 1, "newer"),
                                                  (None, "has no schema_version")])
def test_tables_of_other_versions_are_refused_by_stats_figures_and_report(tmp_path, capsys, version, message):
    tables = tmp_path / "tables"
    tables.mkdir()
    runs = pd.DataFrame({"run_id": ["f/v/seed0"], "status": ["ok"]})
    if version is not None:
        runs["schema_version"] = version
    runs.to_parquet(tables / "runs.parquet")
    with pytest.raises(RecordError, match=message):
        check_tables(tables)
    for command in (["stats"], ["figures", "--out-dir", str(tmp_path / "f")],
                    ["report", "--out-dir", str(tmp_path / "p")]):
        code, err = _cli([*command, "--tables", str(tables)], capsys)
        assert code == 2 and message in err and "runs.parquet" in err


def test_tables_written_now_carry_the_version(tmp_path):
    from lora_bench.analysis.tables import collect, write_tables

    path = _record(tmp_path, "r.json", {"schema_version": SCHEMA_VERSION, "status": "failed", "error": "x",
                                        "error_kind": "error", "run": {"family": "f", "variant": "v", "seed": 0}})
    runs, metrics = collect([path])
    write_tables(runs, metrics, tmp_path / "tables")
    assert pd.read_parquet(tmp_path / "tables/runs.parquet")["schema_version"].tolist() == [SCHEMA_VERSION]
    check_tables(tmp_path / "tables")


@pytest.mark.parametrize("content", [b'"1","' + b"x" * 200_000 + b'"\n', b'"1","caf\xe9"\n'],
                         ids=["field over the csv limit", "not UTF-8"])
def test_a_corrupted_pang_lee_download_is_named(tmp_path, content):
    from lora_bench.run.data import PANG_LEE_FILES

    folder = tmp_path / "pang_lee"
    folder.mkdir()
    for name in PANG_LEE_FILES.values():
        (folder / name).write_bytes(content)
    spec = RunConfig.from_dict({"data": {"source": "pang_lee", "name": "sentences", "cache_dir": str(tmp_path)}}).data
    with pytest.raises(DataError, match="delete it to download it again") as err:
        load_examples(spec)
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("task", ["classification", "instruct"])
def test_a_hub_model_that_cannot_be_loaded_is_named_with_the_offline_alternative(task, monkeypatch):
    import huggingface_hub.constants

    from lora_bench.config import ModelConfig
    from lora_bench.run.causal_lm import load_causal_lm
    from lora_bench.run.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The Hub library reads the variable at import; without this it would try the network and time out.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = ModelConfig(source="hub", name="no-such-owner/no-such-model", dtype="float32")
    with pytest.raises(ConfigError) as error:
        load_model(spec, num_labels=2) if task == "classification" else load_causal_lm(spec)
    message = str(error.value)
    assert "'no-such-owner/no-such-model'" in message and "(HF_HUB_OFFLINE=1 is set)" in message
    assert "Without Hub access use model.source: embedded" in message
