"""Config schemas: unknown keys and wrong types are errors naming the key and file; shipped configs validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_bench.config import ConfigError, RunConfig, load_run_config, parse_yaml
from lora_bench.study import load_study, study_from_dict

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_STUDIES = sorted(ROOT.glob("config/*.yaml")) + [ROOT / ".test" / "config.yaml"]


def test_defaults_fill_a_complete_run():
    cfg = RunConfig.from_dict({})
    assert cfg.method.lora.rank == 8 and cfg.method.lora.targets == ["query", "value"]
    assert cfg.model.source == "embedded" and cfg.data.source == "pang_lee"


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    message = str(err.value)
    assert "learning_rate" in message and str(path) in message and "train" in message


def test_wrong_type_names_dotted_key():
    with pytest.raises(ConfigError, match=r"method\.lora\.rank"):
        RunConfig.from_dict({"method": {"lora": {"rank": "eight"}}}, source="x.yaml")


def test_enum_and_cross_field_rules():
    with pytest.raises(ConfigError, match="scaling"):
        RunConfig.from_dict({"method": {"lora": {"scaling": "alpha*r"}}})
    with pytest.raises(ConfigError, match="sum to 1"):
        RunConfig.from_dict({"data": {"split": {"train": 0.5, "validation": 0.1, "test": 0.1}}})
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        RunConfig.from_dict({"train": {"precision": "fp16", "device": "cpu"}})


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")


def test_scientific_notation_is_a_float():
    assert parse_yaml("lr: 1e-3")["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("path", SHIPPED_STUDIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_study_validates(path):
    study = load_study(path)
    assert study.runs()
    for family in study.families.values():
        assert family.baseline in family.variants


def _study(**families):
    return {"seeds": [0, 1], "base": {"model": {"source": "random", "name": "tiny-bert"}}, "families": families}


def test_study_errors_name_family_and_variant():
    with pytest.raises(ConfigError, match=r"families\.f\.variants\.v"):
        study_from_dict(_study(f={"baseline": "v", "variants": {"v": {"train": {"epoch": 2}}}}))
    with pytest.raises(ConfigError, match="baseline 'x' is not one of its variants"):
        study_from_dict(_study(f={"baseline": "x", "variants": {"v": {}}}))
    with pytest.raises(ConfigError, match="unknown key"):
        study_from_dict({**_study(f={"baseline": "v", "variants": {"v": {}}}), "sedes": [1]})
    with pytest.raises(ConfigError, match="unknown experiment family"):
        study_from_dict(_study(f={"baseline": "v", "variants": {"v": {}}})).run_config("g", "v", 0)


def test_grid_generates_named_variants_and_a_new_family_needs_no_code():
    study = study_from_dict(_study(
        my_new_family={"baseline": "rank2-alpha4", "grid": {"method.lora.rank": [2, 4], "method.lora.alpha": [4]}},
    ))
    family = study.families["my_new_family"]
    assert family.kind == "generic"
    assert sorted(family.variants) == ["rank2-alpha4", "rank4-alpha4"]
    assert study.run_config("my_new_family", "rank4-alpha4", 1).method.lora.rank == 4
    assert len(study.runs()) == 4


MINI_STUDY = """
name: {name}
{base_from}
base:
  model: {{source: random, name: tiny-bert}}
  data: {{source: synthetic, max_length: 16}}
  train: {{epochs: {epochs}, lr: 1.0e-3}}
families:
  methods:
    baseline: lora
    variants: {{lora: {{}}}}
"""


def _write_study(path: Path, name: str, epochs: int, base_from: str = "") -> Path:
    path.write_text(MINI_STUDY.format(name=name, epochs=epochs, base_from=base_from))
    return path


def test_base_from_merges_the_named_studys_base_under_its_own(tmp_path):
    parent = _write_study(tmp_path / "parent.yaml", "parent", 3)
    (tmp_path / "sub").mkdir()
    # Relative to the naming file's folder; only the keys it sets change.
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("name: child\nbase_from: ../parent.yaml\nbase: {train: {epochs: 2}}\n"
                     "families: {methods: {baseline: lora, variants: {lora: {}}}}\n")
    parent_run = load_study(parent).run_config("methods", "lora", 0).to_dict()
    child_run = load_study(child).run_config("methods", "lora", 0).to_dict()
    assert child_run["train"]["epochs"] == 2 and parent_run["train"]["epochs"] == 3
    child_run["train"]["epochs"] = 3
    assert child_run == parent_run
    assert load_study(child).name == "child"  # only the base is inherited


def test_base_from_follows_chains_and_names_cycles_and_missing_files(tmp_path):
    _write_study(tmp_path / "a.yaml", "a", 4)
    _write_study(tmp_path / "b.yaml", "b", 3, "base_from: a.yaml")
    (tmp_path / "c.yaml").write_text("base_from: b.yaml\nfamilies: {m: {baseline: lora, variants: {lora: {}}}}\n")
    run = load_study(tmp_path / "c.yaml").run_config("m", "lora", 0).to_dict()
    assert run["train"]["epochs"] == 3 and run["model"]["name"] == "tiny-bert"

    _write_study(tmp_path / "x.yaml", "x", 1, "base_from: y.yaml")
    _write_study(tmp_path / "y.yaml", "y", 1, "base_from: x.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_study(tmp_path / "x.yaml")
    _write_study(tmp_path / "lost.yaml", "lost", 1, "base_from: nowhere.yaml")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml.*does not exist"):
        load_study(tmp_path / "lost.yaml")
    (tmp_path / "nobase.yaml").write_text("families: {m: {baseline: lora, variants: {lora: {}}}}\n")
    _write_study(tmp_path / "orphan.yaml", "orphan", 1, "base_from: nobase.yaml")
    with pytest.raises(ConfigError, match="no `base` block"):
        load_study(tmp_path / "orphan.yaml")
    with pytest.raises(ConfigError, match="base_from is not resolved"):
        study_from_dict({"base_from": "a.yaml", "families": {}})


def test_studies_on_the_default_base_differ_from_it_only_where_they_say():
    """cpu_more and cpu_variants name the default study's base instead of copying it (their tables were
    measured at 2 epochs): every other key of their runs' base is the default study's. cpu_more3 repeats two of
    cpu_more's families on that base as it is now, differing from it only in the learning rate (and in widening a
    tuning grid whose choice sits at an end, tune.extend, which cpu_more's tables predate)."""
    from lora_bench.config import load_yaml

    default = load_study(ROOT / "config/config.yaml").run_config("methods", "lora", 0).to_dict()
    for name, family, variant in [("cpu_more", "coverage", "query+value"), ("cpu_variants", "lora_variants", "lora")]:
        own = load_yaml(ROOT / f"config/{name}.yaml")
        assert own["base_from"] == "config.yaml"
        run = load_study(ROOT / f"config/{name}.yaml").run_config(family, variant, 0).to_dict()
        assert run["train"]["epochs"] == 2
        for key in ("model", "data"):
            assert run[key] == default[key], (name, key)
        assert run["method"]["lora"] == default["method"]["lora"]
    # cpu_more3 repeats cpu_more's tuned-setting families on the default's base as it is now: only the rate differs.
    more3 = load_study(ROOT / "config/cpu_more3.yaml")
    more = load_study(ROOT / "config/cpu_more.yaml")
    for family in ("rank_alpha", "coverage"):
        assert more3.families[family].variants.keys() == more.families[family].variants.keys()
        widened, plain = more3.families[family].tune, more.families[family].tune
        assert (widened["extend"], plain["extend"]) == (1, 0)
        assert widened["base_grids"] == plain["grids"]
        same = {k: v for k, v in widened.items() if k not in ("extend", "grids", "base_grids")}
        assert same == {k: v for k, v in plain.items() if k not in ("extend", "grids", "base_grids")}
    run = more3.run_config("coverage", "query+value", 0).to_dict()
    assert run["train"].pop("lr") == 3.0e-4
    default["train"].pop("lr")
    assert run == default


def test_the_192_question_tuning_trains_what_instructs_tuning_trained_but_for_its_validation_set():
    """config/instruct_tune192.yaml asks whether instruct's tuning picks hold on 4x the validation questions; the
    answer means that only if each of its tuning runs is instruct's run of the same variant and rate, on the same
    seed, with nothing changed but the validation set (48 -> 192 questions, the 48 among them)."""
    ours, theirs = load_study(ROOT / "config" / "instruct_tune192.yaml"), load_study(ROOT / "config" / "instruct.yaml")
    tuning = ours.families["instruct"].tune["family"]
    assert tuning == theirs.families["instruct"].tune["family"]
    family = ours.families[tuning]
    variants = [*family.variants, *family.rerun_variants]  # the grids, then the values an extension may add
    assert len(variants) == 25 and family.seeds == theirs.families[tuning].seeds
    for variant in variants:
        for seed in ours.families[tuning].seeds:
            mine, instructs = (study.run_config(tuning, variant, seed).to_dict() for study in (ours, theirs))
            assert (mine["data"]["max_examples"]["validation"], instructs["data"]["max_examples"]["validation"]) \
                == (192, 48)
            mine["data"]["max_examples"]["validation"] = 48
            assert mine == instructs, variant


def test_the_192_question_picks_study_is_instructs_runs_at_the_rates_that_tuning_chose():
    """config/instruct_picks192.yaml re-tests instruct's coverage and alpha claims at the rates chosen on 192
    validation questions: each of its runs must be instruct's run of the same variant and seed but for the learning
    rate, and that rate must be the committed 192-question selection's (results/tune192)."""
    ours, theirs = load_study(ROOT / "config" / "instruct_picks192.yaml"), load_study(ROOT / "config" / "instruct.yaml")
    chosen = json.loads((ROOT / "results/tune192/instruct/tune/instruct/selection.json").read_text())["chosen"]
    family = ours.families["instruct"]
    assert set(family.variants) == {"lora", "all-layers", "alpha-r"}
    assert family.seeds == theirs.families["instruct"].seeds
    for variant in family.variants:
        for seed in family.seeds:
            mine, instructs = (study.run_config("instruct", variant, seed).to_dict() for study in (ours, theirs))
            assert mine["train"]["lr"] == chosen[variant], variant
            mine["train"]["lr"] = instructs["train"]["lr"]
            assert mine == instructs, variant


def test_the_five_seed_study_is_cpu_more3s_runs_at_its_committed_rates():
    """config/cpu_more3_seeds5.yaml asks whether cpu_more3's rank x alpha and coverage verdicts hold on 5 seeds: each
    of its runs must be cpu_more3's run of the same variant and seed, at the rate cpu_more3's committed selection
    chose (results/more3/tune), and seeds 0-2 must be cpu_more3's own seeds."""
    ours, theirs = load_study(ROOT / "config" / "cpu_more3_seeds5.yaml"), load_study(ROOT / "config" / "cpu_more3.yaml")
    for name in ("rank_alpha", "coverage"):
        chosen = json.loads((ROOT / f"results/more3/tune/{name}/selection.json").read_text())["chosen"]
        family, reference = ours.families[name], theirs.families[name]
        assert set(family.variants) == set(reference.variants) == set(chosen), name
        assert family.baseline == reference.baseline and family.tune is None, name
        assert tuple(family.seeds) == (0, 1, 2, 3, 4) and tuple(family.seeds[:3]) == tuple(reference.seeds), name
        for variant in family.variants:
            for seed in family.seeds:
                mine, more3 = (study.run_config(name, variant, seed).to_dict() for study in (ours, theirs))
                assert mine["train"]["lr"] == chosen[variant], (name, variant)
                mine["train"]["lr"] = more3["train"]["lr"]
                assert mine == more3, (name, variant, seed)
