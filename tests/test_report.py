"""Tests of lora_bench.report (render, sections, formatting): the report builds from tables and figures alone
and says what it must."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from synthetic import REALISTIC_EFFECTS, make_tables, memory_time_family

from lora_bench.analysis import compare, stats
from lora_bench.report import figures, formatting, render
from lora_bench.report.sections.converged import converged_rows

FAMILIES = ("methods", "rank_alpha", "coverage", "epochs", "optimizer", "memory_time")
GPU = "cuda:0 (NVIDIA H100 80GB HBM3)"
FAILED_RUN = "methods/full/seed1"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    runs, metrics = make_tables(
        FAMILIES, n_seeds=3, n_epochs=2, effects=REALISTIC_EFFECTS, failed=[FAILED_RUN]
    )
    tables = root / "results" / "tables"
    tables.mkdir(parents=True)
    runs.to_parquet(tables / "runs.parquet")
    metrics.to_parquet(tables / "metrics.parquet")
    stats.run_stats(tables / "metrics.parquet", tables / "runs.parquet", tables)
    figures_dir = root / "results" / "figures"
    figures.make_all_figures(runs, metrics, figures_dir)
    paths = render.build_report(tables, figures_dir, root / "paper", meta={"config": "config/test.yaml"})
    return {
        "root": root,
        "paths": paths,
        "md": paths["markdown"].read_text(encoding="utf-8"),
        "html": paths["html"].read_text(encoding="utf-8"),
    }


def test_files_exist(built):
    assert built["paths"]["markdown"] == built["root"] / "paper" / "report.md"
    assert built["paths"]["markdown"].stat().st_size > 0 and built["paths"]["html"].stat().st_size > 0


def test_html_embeds_every_family_figure(built):
    images = re.findall(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', built["html"])
    assert len(images) == len(FAMILIES)
    assert "../results/figures" not in built["html"]  # nothing points outside the file


def test_markdown_references_figures_by_relative_path(built):
    for family in FAMILIES:
        assert f"](../results/figures/{family}.png)" in built["md"]


def test_every_section_is_present(built):
    for family in FAMILIES:
        assert f"## Family: {family.replace('_', chr(92) + '_')}" in built["md"]
        assert f">Family: {family}</h2>" in built["html"]
    for heading in (
        "Setup",
        "Methods: how the numbers were computed",
        "How consistent are seeds",
        "Failed runs",
        "Reference results",
    ):
        assert f"## {heading}" in built["md"]
        assert f">{heading}</h2>" in built["html"]


def test_failed_run_is_listed_with_its_error(built):
    failed_section = built["md"].split("## Failed runs", 1)[1].split("## Reference results", 1)[0]
    assert f"`{FAILED_RUN}`" in failed_section and "CUDA out of memory" in failed_section
    # The error holds "<...>": escaped, not swallowed as an HTML tag.
    assert "&lt;synthetic failure&gt;" in built["html"]


def test_claims_and_verdicts(built):
    md = built["md"]
    assert "**last\\_layers** is worse than **lora**:" in md
    assert "No significant difference between" in md
    assert re.search(r"Holm p (=|<) [0-9.<]", md)
    # Every null result says what it rules out, and only null results do.
    for sentence in re.findall(r"[^\n]*No significant difference between[^\n]*", md):
        assert re.search(r"it finds \d+\.\d points or more with 80% power", sentence), sentence
    beats = re.findall(r"[^\n]* beats [^\n]*", md)
    assert beats and not any("with 80% power" in sentence for sentence in beats)


def test_reference_section_is_honest_about_settings(built):
    reference_section = built["md"].split("## Reference results", 1)[1]
    assert "**Setting differs**" in reference_section  # DistilBERT + IMDb vs our MiniLM + Pang & Lee
    assert "Same model and data source as ours" in reference_section  # the CPU peer measurement
    assert "89.44\u00a0%" in reference_section and "81.1 ± 1.1 %" in reference_section
    assert "pooler was never trained" in reference_section
    assert "inside our 95% CI" in reference_section or "outside our 95% CI" in reference_section


def test_epochs_family_has_per_epoch_table(built):
    epochs_section = built["md"].split("## Family: epochs", 1)[1].split("## Family:", 1)[0]
    assert "| Variant | Epoch |" in epochs_section and "lora@epoch2" in epochs_section


def test_report_refuses_missing_tables(tmp_path):
    with pytest.raises(FileNotFoundError, match="lora_bench"):
        render.build_report(tmp_path, tmp_path, tmp_path / "paper")


def test_report_from_single_seed_tables(tmp_path):
    runs, metrics = make_tables(["methods", "epochs"], n_seeds=1, n_epochs=2)
    runs.to_parquet(tmp_path / "runs.parquet")
    metrics.to_parquet(tmp_path / "metrics.parquet")
    stats.run_stats(tmp_path / "metrics.parquet", tmp_path / "runs.parquet", tmp_path)
    paths = render.build_report(tmp_path, tmp_path / "figures-not-built", tmp_path / "paper")
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "was not tested" in md and "Figure missing" in md and "None: all" in md


@pytest.mark.parametrize(
    ("p", "text"), [(0.0004, "< 0.001"), (0.01234, "0.0123"), (0.5, "0.5"), (float("nan"), "–")]
)
def test_p_value_format(p, text):
    assert formatting.fmt_p(p) == text


def test_number_formats():
    assert formatting.fmt_percent(0.89437) == "89.44"
    assert formatting.fmt_points(0.0123) == "+1.23" and formatting.fmt_points(-0.0123) == "−1.23"
    assert formatting.fmt_count(22713986) == "22,713,986"


@pytest.mark.parametrize(
    "kind", ["methods", "rank_alpha", "coverage", "epochs", "optimizer", "generic", "new"]
)
def test_snakemake_caption_is_rst(kind):
    caption = render.snakemake_report_caption(kind)
    assert caption.startswith("**") and "95 %" in caption and caption.endswith("\n")


# ----------------------------------------------------------------------------------------------------
# memory_time families


def _section(md: str, heading: str) -> str:
    return md.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


def test_memory_time_section(built):
    section = _section(built["md"], "## Family: memory\\_time")
    assert "| Variant | Method | Model | Optimizer | LoRA targets | Seq length |" in section
    assert "Test accuracy" not in section and "No comparison of test accuracy" not in section
    assert "| qlora | qlora | tiny-llama | adamw | query+value | 128 | 3 |" in section
    assert "all weights" in section  # full finetuning has no LoRA targets
    # On CPU the memory is the exact state bytes: planted 0.6x and 3x, identical in every run.
    assert "**qlora** uses exactly 0.60× the memory of **lora**" in section
    assert "**full** uses exactly 3.00× the memory of **lora**" in section
    assert re.search(r"takes 1\.[23]\d× the time per step \(95% CI 1\.\d\d× to 1\.\d\d×; paired t, Holm p", section)
    assert "](../results/figures/memory_time.png)" in section
    # The headline carries the memory and time sentences too, and no table shows NaN.
    assert "**Memory and time**" in built["md"].split("## Setup", 1)[0]
    assert not re.search(r"\bnan\b", built["md"], flags=re.IGNORECASE)


def test_memory_time_references_compare_only_ratios_in_another_setting(built):
    h100 = _section(built["md"], "### Llama-2-7B-shaped model")
    # A tiny Llama on CPU is not the peer's Llama-2-7B on an H100: only the ratios are compared.
    assert "**Setting differs**" in h100 and "only the ratios" in h100
    assert "absolute values not compared" in h100
    assert "| 0.44× | memory\\_time/qlora vs lora (state bytes) | 0.60×" in h100
    assert "| 1.21× | memory\\_time/qlora vs lora (median step time) | 1." in h100
    alpaca = _section(built["md"], "### Llama-2-7B on Alpaca")
    assert "−33.0 % (0.67×)" in alpaca and "+39.0 % (1.39×)" in alpaca and "+50.8 % (1.51×)" in alpaca
    assert "ours is time per step, theirs total training time" in alpaca


def _build(tmp_path, families, n_seeds=3, device="cpu", draw_figures=True):
    runs, metrics = make_tables(families, n_seeds=n_seeds, device=device)
    tables = tmp_path / "tables"
    tables.mkdir()
    runs.to_parquet(tables / "runs.parquet")
    metrics.to_parquet(tables / "metrics.parquet")
    stats.run_stats(tables / "metrics.parquet", tables / "runs.parquet", tables)
    if draw_figures:
        figures.make_all_figures(runs, metrics, tmp_path / "figures")
    paths = render.build_report(tables, tmp_path / "figures", tmp_path / "paper")
    return paths["markdown"].read_text(encoding="utf-8"), paths["html"].read_text(encoding="utf-8")


def test_report_of_a_study_without_accuracy(tmp_path):
    md, html = _build(tmp_path, ["memory_time"])
    headline = md.split("## Setup", 1)[0]
    assert "No accuracy was evaluated" in headline and "this study evaluated no accuracy" in headline
    assert "could be tested" not in headline and "**qlora** uses" in headline
    assert "Not applicable: this study evaluated no accuracy." in md
    assert "| Variant | n | Test accuracy" not in md and not re.search(r"\bnan\b", md, flags=re.IGNORECASE)
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', html)) == 1


def test_report_compares_absolute_numbers_only_in_the_same_setting(tmp_path):
    md, _ = _build(tmp_path, [memory_time_family(model="llama-2-7b")], device=GPU, draw_figures=False)
    h100 = _section(md, "### Llama-2-7B-shaped model")
    assert "Same model config as ours" in h100 and "Setting differs" not in h100
    assert "absolute values not compared" not in h100
    assert re.search(r"peak cuda allocated \| 15\.73 GiB \| memory\\_time/lora \| 1\.\d\d GiB", h100)
    assert "outside our 95% CI" in h100  # a synthetic 1.9 GiB is not 15.73 GiB
    alpaca = _section(md, "### Llama-2-7B on Alpaca")
    assert "**Setting differs**" in alpaca  # the same model on CUDA, but not lit-gpt on Alpaca on an A100
    assert "(peak cuda allocated)" in alpaca


def test_report_same_model_on_cpu_is_a_different_setting(tmp_path):
    md, _ = _build(tmp_path, [memory_time_family(model="llama-2-7b")], n_seeds=2, draw_figures=False)
    h100 = _section(md, "### Llama-2-7B-shaped model")
    assert "**Setting differs**" in h100 and "on cpu" in h100 and "absolute values not compared" in h100


def test_report_requires_cost_summary_for_memory_time(tmp_path):
    _build(tmp_path, ["memory_time"], n_seeds=1, draw_figures=False)
    (tmp_path / "tables" / "cost_summary.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="lora_bench stats"):
        render.build_report(tmp_path / "tables", tmp_path, tmp_path / "paper")


def _study_with_flags(tmp_path, untrained: dict[str, dict], expect: dict[str, str] | None = None):
    """The methods family with learning diagnostics: ``untrained`` = run id -> flags that fail."""
    runs, metrics = make_tables(("methods",), n_seeds=3, effects={("methods", "full"): 0.05})
    good = {"learned": True, "collapsed": False, "diverged": False, "plateaued": True}
    for column, value in good.items():
        runs[column] = value
    runs["trained"], runs["learned_p"], runs["expect"] = True, 1e-6, ""
    for run_id, flags in untrained.items():
        row = runs["run_id"] == run_id
        for column, value in flags.items():
            runs.loc[row, column] = value
        runs.loc[row, "trained"] = False
    for variant, expected in (expect or {}).items():
        runs.loc[runs["variant"] == variant, "expect"] = expected
    tables = tmp_path / "tables"
    tables.mkdir()
    runs.to_parquet(tables / "runs.parquet")
    metrics.to_parquet(tables / "metrics.parquet")
    stats.run_stats(tables / "metrics.parquet", tables / "runs.parquet", tables)
    return tables


def test_a_comparison_with_a_run_that_did_not_learn_is_inconclusive_not_a_finding(tmp_path):
    tables = _study_with_flags(tmp_path, {"methods/full/seed1": {"learned": False, "collapsed": True}})
    tests = compare.compare_to_baseline(*[pd.read_parquet(tables / f"{n}.parquet")
                                        for n in ("metrics", "runs")])
    full = tests.set_index("variant").loc["full"]
    assert full["verdict"] == "better" and full["convergence"] == "inconclusive" and full["untrained_variant"] == 1
    assert tests.set_index("variant").loc["last_layers", "convergence"] == "trained"
    md = render.build_report(tables, tmp_path / "figures", tmp_path / "paper")["markdown"].read_text()
    findings = md.split("**Main findings**")[1].split("\n\n## ")[0] if "**Main findings**" in md else ""
    assert "**full**" not in findings
    assert "1 comparison is inconclusive: training did not" in md and "it is not a finding" in md
    # The one significant comparison is inconclusive: the summary must not call it "not significant".
    assert "**No finding**: 1 comparison was" in md and "was significant** after Holm" not in md
    assert "**Inconclusive: training did not converge** (1 run(s) of full" in md
    assert "| methods/full/seed1 | did not learn, collapsed | no |" in md


def test_a_variant_that_expects_no_learning_reads_as_expected(tmp_path):
    tables = _study_with_flags(tmp_path, {f"methods/last_layers/seed{s}": {"learned": False} for s in range(3)},
                               expect={"last_layers": "no_learning"})
    md = render.build_report(tables, tmp_path / "figures", tmp_path / "paper")["markdown"].read_text()
    assert "**As expected**: the variant declares `expect: no_learning`" in md
    assert f"| {formatting.md_text('methods/last_layers/seed0')} | did not learn | yes (expect: no_learning) |" in md


def test_converged_reference_section_says_which_differences_hold(tmp_path):
    from dataclasses import replace

    from synthetic import FAMILIES

    ours = tmp_path / "ours"
    converged = tmp_path / "converged"
    # The reference also runs a variant this study does not (as config/cpu_full.yaml runs lora_kaiming).
    with_kaiming = replace(FAMILIES["methods"], variants=(*FAMILIES["methods"].variants, "lora_kaiming"))
    for folder, family, full_effect in ((ours, "methods", 0.05), (converged, with_kaiming, 0.015)):
        runs, metrics = make_tables((family,), n_seeds=3, n_epochs=5,
                                    effects={("methods", "full"): full_effect, ("methods", "last_layers"): -0.10,
                                             ("methods", "lora_kaiming"): 0.016})
        folder.mkdir()
        runs.to_parquet(folder / "runs.parquet")
        metrics.to_parquet(folder / "metrics.parquet")
        stats.run_stats(folder / "metrics.parquet", folder / "runs.parquet", folder)
    rows = {r["variant"]: r for r in converged_rows(
        pd.read_parquet(ours / "tests.parquet"),
        pd.read_parquet(converged / "tests.parquet"), "methods")}
    assert rows[formatting.md_text("last_layers")]["holds"] == "yes" and rows["full"]["holds"] == "**no**"
    assert rows[formatting.md_text("lora_kaiming")]["ours"] == "not in this study"
    assert rows[formatting.md_text("lora_kaiming")]["reference"].startswith("+")  # planted +1.6 points
    md = render.build_report(ours, tmp_path / "figures", tmp_path / "paper",
                             reference={"tables": str(converged), "family": "methods"})["markdown"].read_text()
    assert "## This study vs the converged reference" in md and "| full | lora |" in md
    # The reference's setting comes from its own runs table, not from the template.
    assert "5 epochs" in md and "3 epochs" not in md.split("## This study vs the converged reference")[1][:600]
    assert f"| {formatting.md_text('lora_kaiming')} | lora | not in this study |" in md
    with pytest.raises(FileNotFoundError, match="converged_reference"):
        render.build_report(ours, tmp_path / "figures", tmp_path / "paper",
                            reference={"tables": str(tmp_path / "nowhere"), "family": "methods"})


def test_a_difference_that_holds_only_inside_a_wide_converged_ci_says_how_far_off_it_is():
    def tests(diff, low, high):
        return pd.DataFrame([{"family": "methods", "metric": "accuracy", "split": "test", "variant": "full",
                              "baseline": "lora", "diff": diff, "diff_ci_low": low, "diff_ci_high": high,
                              "n_pairs": 3, "n_variant": 3}])

    # The default study against the 5-epoch reference: +5.1 here, +2.7 [-0.5, +5.9] there.
    (row,) = converged_rows(tests(0.051, 0.031, 0.072), tests(0.027, -0.005, 0.059), "methods")
    assert row["holds"] == "yes, inside the converged CI (size off by +2.4 points)" and row["gap"] == "+2.40"
    (row,) = converged_rows(tests(0.040, 0.02, 0.06), tests(0.027, -0.005, 0.059), "methods")
    assert row["holds"] == "yes"
    (row,) = converged_rows(tests(0.070, 0.05, 0.09), tests(0.027, -0.005, 0.059), "methods")
    assert row["holds"] == "**no**"


def test_memory_time_shows_ours_over_peft_in_the_table_and_the_figure(tmp_path):
    from test_stats import _with_peft_twin

    runs, metrics = _with_peft_twin(*make_tables(["memory_time"], n_seeds=3, device=GPU), factor=1.25)
    tables = tmp_path / "tables"
    tables.mkdir()
    runs.to_parquet(tables / "runs.parquet")
    metrics.to_parquet(tables / "metrics.parquet")
    stats.run_stats(tables / "metrics.parquet", tables / "runs.parquet", tables)
    fig = figures.plot_memory_time(runs, metrics, "memory_time")
    labels = [t.get_text() for t in fig.axes[0].texts]
    figures.plt.close(fig)
    assert "ours/peft time 0.80x" in labels
    figures.make_all_figures(runs, metrics, tmp_path / "figures")
    md = render.build_report(tables, tmp_path / "figures", tmp_path / "paper")["markdown"].read_text()
    section = _section(md, "## Family: memory\\_time")
    assert "| Ours | peft | Memory ours/peft (95% CI) |" in section
    assert "| lora | lora-peft | 0.80× (0.80× to 0.80×) | 0.80× (0.80× to 0.80×) | 1.25× (1.25× to 1.25×) |" in section
    assert not re.search(r"\bnan\b", md, flags=re.IGNORECASE)


def test_cost_phrase_tells_equal_bytes_from_identical_different_ones_and_from_an_untestable_time():
    from lora_bench.report.sections.common import ratio_cells, ratio_phrase

    what = "uses {ratio} the memory of **{baseline}**"
    base = {"ratio": 1.0, "p_value": float("nan"), "p_holm": float("nan"), "exact": False, "significant": False,
            "test": "paired t", "diff": 0.0, "diff_ci_low": 0.0, "diff_ci_high": 0.0,
            "note": "the paired differences have zero variance: t test undefined"}
    equal = ratio_phrase({**base, "unit": "bytes"}, what, "lora")
    assert equal.startswith("uses exactly 1.00×") and "no difference" in equal and "not tested" not in equal
    differ = ratio_phrase({**base, "unit": "bytes", "ratio": 0.6, "diff": -5.0, "diff_ci_low": -5.0,
                           "diff_ci_high": -5.0, "exact": True, "significant": True}, what, "lora")
    assert differ.startswith("uses exactly 0.60×") and "identical in every run of both" in differ
    # A measured time that happens to tie is still reported as untested, not as exact.
    timed = ratio_phrase({**base, "unit": "s"}, what, "lora")
    assert "not tested" in timed and "exactly" not in timed
    assert ratio_cells({**base, "unit": "bytes"}) == ("1.00× (equal)", "equal")
    assert ratio_cells({**base, "unit": "s"})[1] == "–"


def test_the_setup_table_names_each_cpu_the_runs_ran_on():
    from synthetic import make_tables

    from lora_bench.report.sections.overview import setup_rows

    runs, _ = make_tables(families=("methods",), n_seeds=2)
    assert "CPU (torch kernels)" not in dict(setup_rows(runs, {}))  # tables from before the columns
    runs["cpu_capability"], runs["cpu_id"] = "AVX2", "AuthenticAMD family 25 model 1 stepping 1"
    runs.loc[runs.index[0], ["cpu_capability", "cpu_id"]] = ["AVX512", "AuthenticAMD family 25 model 17 stepping 1"]
    rows = dict(setup_rows(runs, {}))
    assert rows["CPU (torch kernels)"] == ("AuthenticAMD family 25 model 1 stepping 1 (AVX2), "
                                           "AuthenticAMD family 25 model 17 stepping 1 (AVX512)")
