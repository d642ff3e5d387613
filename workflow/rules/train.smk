# Data preparation and one training job per (family, variant, seed).


rule prepare_data:
    output:
        touch(f"{RESULTS}/data/prepared.done"),
    log:
        "logs/prepare_data.log",
    conda:
        "../../envs/lora-bench.yaml"
    params:
        specs=data_specs_json(),
    shell:
        "python -m lora_bench prepare-data --specs-json {params.specs:q} > {log:q} 2>&1"


rule train:
    input:
        # ancient: re-preparing data (e.g. after a new family) must not re-train finished runs; a run
        # re-trains when its own resolved config (params.cfg) changes.
        ancient(f"{RESULTS}/data/prepared.done"),
    output:
        f"{RESULTS}/runs/{{family}}/{{variant}}/seed{{seed}}.json",
    log:
        "logs/train/{family}/{variant}/seed{seed}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{family}}/{{variant}}/seed{{seed}}.tsv"
    conda:
        "../../envs/lora-bench.yaml"
    threads: STUDY.threads
    resources:
        gpu=STUDY.gpus_per_job,
    params:
        cfg=run_config_json,
        labels=run_labels_json,
        gpu=gpu_flag(),
    shell:
        "python -m lora_bench train --config-json {params.cfg:q} --label {params.labels:q}"
        " --set train.threads={threads} {params.gpu} --out {output:q} > {log:q} 2>&1"
