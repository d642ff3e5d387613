# Sweeps re-run their best configurations: which ones depends on the sweep's results, so the selection
# is a checkpoint and the re-run jobs are derived from its JSON (common.smk: rerun_record_paths).


checkpoint select_sweep:
    input:
        sweep_stage_record_paths,
    output:
        f"{RESULTS}/sweep/{{family}}/selection.json",
    log:
        "logs/select_sweep/{family}.log",
    conda:
        "../../envs/lora-bench.yaml"
    params:
        top_k=lambda wildcards: STUDY.families[wildcards.family].sweep["top_k"],
    shell:
        "python -m lora_bench select-sweep --family {wildcards.family} --top-k {params.top_k}"
        " --records {input:q} --out {output:q} > {log} 2>&1"
