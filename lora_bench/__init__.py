"""lora-bench: seeded, repeated LoRA / last-layers / full / QLoRA finetuning experiments with error bars."""

__version__ = "0.1.0"

# Version of the run-record and table layout; bumped when their meaning changes.
SCHEMA_VERSION = 1
