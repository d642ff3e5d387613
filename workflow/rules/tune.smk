# Tuned families pick each variant's value (e.g. its learning rate) from validation-only tuning runs: which
# runs the family then trains depends on those results, so the selection is a checkpoint (common.smk:
# trained_record reads it). With tune.extend, each round's selection first asks for one more value beyond an end
# of a grid where the chosen value sits at that end (common.smk: tried_tuning_records): rounds are checkpoints
# too, each made from the records of the rounds before it, and selection.json from those of every round. With
# tune.tie_seeds, one more round (the tie round) lists the values tied at the top, and those alone run again on
# the tie seeds before selection.json is made.

SELECT_TUNE = (
    "python -m lora_bench select-tune --family {wildcards.family} --tune-json {params.tune:q}"
    " --records {input.records:q} --out {output:q}"
)
LOGGED = " > {log:q} 2>&1"


# A round is stamped (made_at): written again, it is a new file even from byte-identical records, so the
# selection (or round) after it runs again and the runs waiting on that are worked out. Without it Snakemake 9 judged
# that next checkpoint up to date once the round had run and never revisited the runs waiting on it: dropped for
# the invocation or, forced, run with unresolved inputs (tests/test_tuning.py).


checkpoint tune_round:
    input:
        records=tuning_round_records,
        # Not read by the command: what the records were listed from (common.smk: round_paths).
        rounds=earlier_round_paths,
    output:
        f"{RESULTS}/tune/{{family}}/round{{round}}.json",
    log:
        "logs/tune_round/{family}/round{round}.log",
    conda:
        "../../envs/lora-bench.yaml"
    params:
        tune=tune_json,
    shell:
        f"{SELECT_TUNE} --stamp{LOGGED}"


checkpoint select_tune:
    input:
        records=tuning_record_paths,
        # Not read by the command: what the records were listed from (common.smk: round_paths).
        rounds=all_round_paths,
    output:
        f"{RESULTS}/tune/{{family}}/selection.json",
    log:
        "logs/select_tune/{family}.log",
    conda:
        "../../envs/lora-bench.yaml"
    params:
        tune=tune_json,
    shell:
        f"{SELECT_TUNE}{LOGGED}"
