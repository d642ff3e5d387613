# Tidy tables -> significance tests -> figures -> report. Each step reads only tables.


rule collect:
    input:
        records=collected_record_paths,
        # Not read: every selection is up to date before the tables are (common.smk: selection_paths).
        selections=selection_paths(),
    output:
        runs=f"{RESULTS}/tables/runs.parquet",
        metrics=f"{RESULTS}/tables/metrics.parquet",
        runs_csv=f"{RESULTS}/tables/runs.csv",
        metrics_csv=f"{RESULTS}/tables/metrics.csv",
        # Per-example results of every run (lora_bench.run.predictions); parquet only.
        predictions=f"{RESULTS}/tables/predictions.parquet",
    log:
        "logs/collect.log",
    conda:
        "../../envs/lora-bench.yaml"
    params:
        tables=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "python -m lora_bench collect --records {input.records:q} --out-dir {params.tables:q} > {log:q} 2>&1"


rule stats:
    input:
        rules.collect.output.runs,
        rules.collect.output.metrics,
        rules.collect.output.predictions,
    output:
        tests=f"{RESULTS}/tables/tests.parquet",
        summary=f"{RESULTS}/tables/summary.parquet",
        seeds=f"{RESULTS}/tables/seed_consistency.parquet",
        # Written (empty) even without a memory_time family, so the outputs do not depend on the config.
        cost=f"{RESULTS}/tables/cost_summary.parquet",
        # lora_bench.analysis.variance: written (empty) without variance or sweep families too.
        variance=f"{RESULTS}/tables/variance_components.parquet",
        sweep=f"{RESULTS}/tables/sweep_reeval.parquet",
        sweep_summary=f"{RESULTS}/tables/sweep_summary.parquet",
        # lora_bench.analysis.tuning: written (empty) without tuned families too.
        tuning=f"{RESULTS}/tables/tuning.parquet",
        # lora_bench.analysis.items (from predictions.parquet): written (empty) when no run kept predictions too.
        item_tests=f"{RESULTS}/tables/item_tests.parquet",
        item_pairs=f"{RESULTS}/tables/item_pairs.parquet",
        item_ranks=f"{RESULTS}/tables/item_ranks.parquet",
        item_summary=f"{RESULTS}/tables/item_summary.parquet",
        # lora_bench.analysis.claims: reference B's claims on instruct families (empty without them).
        claims=f"{RESULTS}/tables/claims.parquet",
    log:
        "logs/stats.log",
    conda:
        "../../envs/lora-bench.yaml"
    params:
        tables=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "python -m lora_bench stats --tables {params.tables:q} > {log:q} 2>&1"


rule figures:
    input:
        rules.collect.output.runs,
        rules.collect.output.metrics,
    output:
        [
            report(
                path,
                caption="../report/figure.rst",
                category="Figures",
            )
            for path in figure_paths()
        ],
    log:
        "logs/figures.log",
    conda:
        "../../envs/lora-bench.yaml"
    params:
        tables=lambda wildcards, input: os.path.dirname(input[0]),
        figures=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "python -m lora_bench figures --tables {params.tables:q} --out-dir {params.figures:q} > {log:q} 2>&1"


# Probability of each rank per variant, from the item-level resampling (lora_bench.analysis.items).
rule item_ranks_figure:
    input:
        rules.stats.output.item_ranks,
    output:
        report(
            f"{RESULTS}/figures/item_ranks.png",
            caption="../report/figure.rst",
            category="Figures",
        ),
    log:
        "logs/item_ranks_figure.log",
    conda:
        "../../envs/lora-bench.yaml"
    params:
        tables=lambda wildcards, input: os.path.dirname(input[0]),
        figures=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "python -m lora_bench figures --item-ranks --tables {params.tables:q} --out-dir {params.figures:q}"
        " > {log:q} 2>&1"


rule report:
    input:
        stats=rules.stats.output,
        figures=rules.figures.output,
        item_ranks=rules.item_ranks_figure.output,
        reference=converged_reference_tests(),
    output:
        md=f"{REPORT}/report.md",
        html=report(
            f"{REPORT}/report.html",
            caption="../report/report.rst",
            category="Report",
        ),
    log:
        "logs/report.log",
    conda:
        "../../envs/lora-bench.yaml"
    params:
        tables=lambda wildcards, input: os.path.dirname(input.stats[0]),
        figures=lambda wildcards, input: os.path.dirname(input.figures[0]),
        out=lambda wildcards, output: os.path.dirname(output.md) or ".",
        reference=converged_reference_flag(),
    shell:
        "python -m lora_bench report --tables {params.tables:q} --figures {params.figures:q}"
        " --out-dir {params.out:q} {params.reference} > {log:q} 2>&1"
