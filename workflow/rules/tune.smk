# Tuned families pick each variant's value (e.g. its learning rate) from validation-only tuning runs: which
# runs the family then trains depends on those results, so the selection is a checkpoint (common.smk:
# trained_record reads it).


checkpoint select_tune:
    input:
        tuning_record_paths,
    output:
        f"{RESULTS}/tune/{{family}}/selection.json",
    log:
        "logs/select_tune/{family}.log",
    conda:
        "../../envs/lora-bench.yaml"
    params:
        tune=tune_json,
    shell:
        "python -m lora_bench select-tune --family {wildcards.family} --tune-json {params.tune:q}"
        " --records {input:q} --out {output:q} > {log:q} 2>&1"
