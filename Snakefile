# lora-bench: runs -> tidy tables -> significance tests -> figures -> report.
# The study is config/config.yaml unless --configfile says otherwise; all logic lives in lora_bench/.
from snakemake.utils import min_version

min_version("9.0")


# Only the default when no --configfile/--config is given: Snakemake would otherwise merge the two
# studies' families into one.
if not config:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/analysis.smk"


rule all:
    input:
        final_targets(),
    default_target: True
