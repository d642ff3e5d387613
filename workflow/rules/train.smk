# Data preparation, one job per distinct data (named by its data key), one training job per distinct resolved
# config (named by its key), and one labelled record per (family, variant, seed): runs that share a config share
# its training.


rule prepare_data:
    output:
        touch(f"{RESULTS}/data/{{data_key}}.done"),
    log:
        "logs/prepare_data/{data_key}.log",
    conda:
        "../../envs/lora-bench.yaml"
    params:
        specs=data_spec_json,
    shell:
        # --keep-failed: data that cannot be prepared fails its runs, which are recorded (failures are data),
        # instead of stopping the study's other data.
        "python -m lora_bench prepare-data --keep-failed --specs-json {params.specs:q} > {log:q} 2>&1"


rule train:
    input:
        prepared_data,
    output:
        f"{RESULTS}/trained/{{key}}.json",
    log:
        "logs/train/{key}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{key}}.tsv"
    conda:
        "../../envs/lora-bench.yaml"
    threads: STUDY.threads
    resources:
        gpu=STUDY.gpus_per_job,
    params:
        cfg=run_config_json,
        gpu=gpu_flag(),
    shell:
        "python -m lora_bench train --config-json {params.cfg:q}"
        " --set train.threads={threads} {params.gpu} --out {output:q} > {log:q} 2>&1"


# A run's record: the trained record with the run's labels (family, variant, seed, ...). Cheap (no torch), so
# it runs on the submitting host, not as a cluster job.
localrules:
    label_run,


rule label_run:
    input:
        trained=trained_record,
        stale=stale_label_marker,
        # Not read by the command: the selection trained_record read (common.smk: tuned_selection).
        selection=tuned_selection,
    output:
        f"{RESULTS}/runs/{{family}}/{{variant}}/seed{{seed}}.json",
    log:
        "logs/label/{family}/{variant}/seed{seed}.log",
    conda:
        "../../envs/lora-bench.yaml"
    params:
        labels=run_labels_json,
    shell:
        "python -m lora_bench label --trained {input.trained:q} --label {params.labels:q} --out {output:q}"
        " > {log:q} 2>&1"
