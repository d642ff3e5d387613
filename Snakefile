# lora-bench: runs -> tidy tables -> significance tests -> figures -> report.
# The study is config/config.yaml unless --configfile says otherwise; all logic lives in lora_bench/.
from snakemake.utils import min_version

min_version("9.0")


# The default study only when no --configfile is given: Snakemake would otherwise merge the two
# studies' families into one. Profile/--config values still apply on top of either.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/tune.smk"
include: "workflow/rules/analysis.smk"


rule all:
    default_target: True
    input:
        final_targets(),
        rerun_record_paths,
        tune_extension_record_paths,
