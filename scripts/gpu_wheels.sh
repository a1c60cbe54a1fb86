#!/usr/bin/env bash
# Wheels for a GPU machine that has PyTorch, transformers, peft and accelerate but no network (as this
# workplace's lent H200 is): what sdstudio needs beyond them, into .whl/ (git-ignored). Carry .whl/ along;
# scripts/gpu_check.sh installs it into /tmp/site. Run it where pip reaches PyPI.
#   scripts/gpu_wheels.sh [PYTHON_VERSION]   (default 3.12, the H200 image's python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PIP=${PIP:-python3 -m pip}
mkdir -p .whl
# Pure-Python wheels. open_clip_torch is needed only for the CLIP BPE vocabulary file it ships (never imported);
# importlib_metadata is diffusers' one requirement the image lacks.
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp -d .whl \
  "diffusers==$(awk -F'==' '/^diffusers==/{print $2}' constraints.txt)" \
  "open_clip_torch>=2.20" \
  tomli_w importlib_metadata
# bitsandbytes (8-bit AdamW, the 6 GB preset): a binary wheel; optional, the gpu tests skip without it.
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp -d .whl \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 bitsandbytes \
  || echo "no bitsandbytes wheel: the 6 GB preset's 8-bit Adam and its test will be skipped"
du -sh .whl && ls .whl
