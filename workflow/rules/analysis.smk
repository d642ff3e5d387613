# Tidy tables -> significance tests -> figures -> report. Each step reads only tables.


rule collect:
    input:
        run_record_paths(),
    output:
        runs=f"{RESULTS}/tables/runs.parquet",
        metrics=f"{RESULTS}/tables/metrics.parquet",
        runs_csv=f"{RESULTS}/tables/runs.csv",
        metrics_csv=f"{RESULTS}/tables/metrics.csv",
    log:
        "logs/collect.log",
    shell:
        "python -m lora_bench collect --records {input} --out-dir {RESULTS}/tables > {log} 2>&1"


rule stats:
    input:
        rules.collect.output.runs,
        rules.collect.output.metrics,
    output:
        tests=f"{RESULTS}/tables/tests.parquet",
        summary=f"{RESULTS}/tables/summary.parquet",
        seeds=f"{RESULTS}/tables/seed_consistency.parquet",
    log:
        "logs/stats.log",
    shell:
        "python -m lora_bench stats --tables {RESULTS}/tables > {log} 2>&1"


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
    shell:
        "python -m lora_bench figures --tables {RESULTS}/tables --out-dir {RESULTS}/figures > {log} 2>&1"


rule report:
    input:
        rules.stats.output,
        rules.figures.output,
    output:
        md=f"{REPORT}/report.md",
        html=report(
            f"{REPORT}/report.html",
            caption="../report/report.rst",
            category="Report",
        ),
    log:
        "logs/report.log",
    shell:
        "python -m lora_bench report --tables {RESULTS}/tables --figures {RESULTS}/figures"
        " --out-dir {REPORT} > {log} 2>&1"
