#!/usr/bin/env bash
# GPU truth (issue #18) in one run on one CUDA GPU, under 8 minutes on an H100/H200, ending with one table:
#   1. the full-size random SD 1.5 (and SDXL) models, built on the GPU (sdstudio tiny-model --size full);
#   2. the gpu tests (pytest -m gpu): mixed precision for every method, GradScaler, AdamW8bit, xformers,
#      OOM as a Failed event, 4 LoRAs + 2 ControlNets + 1 T2I-Adapter at 512/1024 px, the merged-weight budget;
#   3. sdstudio bench train: each memory preset, ours beside the plain diffusers loop, steps/s, samples/s, peak
#      memory, MFU;
#   4. sdstudio bench vram: every preset's measured peak beside its estimate (-> OUT/measured-vram.json; copy it
#      to presets/ and run `sdstudio bench vram --apply presets/measured-vram.json` to regenerate the headers);
#   5. sdstudio bench train --speed: each speed option against the same run without it;
#   6. SDXL: the plain loop's figures (ours says what it cannot do yet).
# Each step has a time budget and the whole run a deadline (GPU_CHECK_SECONDS, default 450): a step that does not
# fit is marked skipped in the table rather than overrunning.
#
# Usage:  scripts/gpu_check.sh [OUT_DIR]          OUT_DIR: $OUT when set, else ./gpu-check
#         GPU_CHECK_DRY_RUN=1 scripts/gpu_check.sh   print the steps' commands, run nothing
#         GPU_CHECK_STEPS="bench-vram bench-speed" scripts/gpu_check.sh   only those steps (a rerun)
# OUT_DIR gets at most 8 files (the table, its JSON/XML sources, env.txt); each step's log is in $WORK/logs.
# Needs sdstudio's dependencies (pip install -e '.[cuda,test]'). A machine without them and without network:
# run scripts/gpu_wheels.sh where pip works, carry .whl/ along; this script installs it into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${1:-${OUT:-$ROOT/gpu-check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
DEADLINE=${GPU_CHECK_SECONDS:-450}
T0=$(date +%s)
WORK=${GPU_CHECK_WORK:-/tmp/sdstudio-gpu-check}
MODELS=$WORK/models
LOGS=$WORK/logs
ONLY=${GPU_CHECK_STEPS:-}
mkdir -p "$LOGS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SDSTUDIO_QUIET=1 \
  SDSTUDIO_BENCH_MODELS=$MODELS SDSTUDIO_CACHE=$WORK/cache GRADIO_ANALYTICS_ENABLED=False

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "$DRY" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
: >"$OUT_DIR/steps.tsv"

# step NAME MAX_SECONDS CMD...: run CMD with the smaller of its budget and what the deadline leaves; record it.
step() {
  local name=$1 max=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  local left=$(( DEADLINE - ($(date +%s) - T0) - 20 ))
  local budget=$(( max < left ? max : left ))
  if [ "$DRY" = 1 ]; then printf '%s\t%s\n' "$name" "$*"; return 0; fi
  if [ "$budget" -lt 20 ]; then printf '%s\tskip\t0\n' "$name" >>"$OUT_DIR/steps.tsv"; return 0; fi
  echo "== $name (up to ${budget}s): $*"
  local s=$(date +%s)
  timeout -k 10 "$budget" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - s ))" >>"$OUT_DIR/steps.tsv"
  tail -n 25 "$LOGS/$name.log"
  return 0
}
SD="$PY -m sdstudio"

# 0. What this machine is.
if [ "$DRY" != 1 ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    $PY -c 'import torch, diffusers, transformers, peft, accelerate; print("torch", torch.__version__, "cuda", torch.version.cuda, "| diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)'
    $PY -c 'import importlib.util as u; print("bitsandbytes:", bool(u.find_spec("bitsandbytes")), "xformers:", bool(u.find_spec("xformers")))'
  } >"$OUT_DIR/env.txt" 2>&1
  cat "$OUT_DIR/env.txt"
  $PY -c 'import diffusers, tomli_w, importlib.util as u; assert u.find_spec("open_clip"), "open_clip_torch"' 2>/dev/null \
    || { echo "missing packages: run scripts/gpu_wheels.sh where pip works and carry .whl/"; exit 3; }
fi

# 1. The full-size models (fp16 on disk, built on the GPU; kept between runs on one machine).
[ -f "$MODELS/sd15/model_index.json" ] && [ "$DRY" != 1 ] ||
  step build-sd15 90 $SD tiny-model "$MODELS/sd15" --size full --family sd15 --device cuda --dtype fp16
# 2. The gpu tests.
# (The browser tests need playwright and chromium, which a GPU box need not have; they hold no gpu test.)
step pytest-gpu 170 $PY -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --ignore-glob="tests/*browser*" \
  --continue-on-collection-errors --junitxml="$OUT_DIR/pytest-gpu.xml" tests
# 3. Ours beside the plain diffusers loop, each memory preset and the batch-8 throughput row.
step bench-train-sd15 120 $SD bench train --arch sd15 --device cuda --models "$MODELS" --steps 20 --warmup 3 \
  --json "$OUT_DIR/train-sd15.json" --budget-s 90
# 4. Every preset's peak memory beside its estimate.
step bench-vram 80 $SD bench vram --arch sd15,sdxl --device cuda --models "$MODELS" --steps 3 --jobs 3 \
  --out "$OUT_DIR/measured-vram.json" --no-headers --budget-s 60
# 5. The speed options.
step bench-speed 130 $SD bench train --arch sd15 --device cuda --models "$MODELS" --speed --steps 15 --warmup 3 \
  --json "$OUT_DIR/speed.json" --budget-s 100
# 6. SDXL (the plain loop; ours refuses until SDXL training lands).
[ -f "$MODELS/sdxl/model_index.json" ] && [ "$DRY" != 1 ] ||
  step build-sdxl 60 $SD tiny-model "$MODELS/sdxl" --size full --family sdxl --device cuda --dtype fp16
step bench-train-sdxl 60 $SD bench train --arch sdxl --device cuda --models "$MODELS" --steps 10 --warmup 2 \
  --json "$OUT_DIR/train-sdxl.json" --budget-s 40

[ "$DRY" = 1 ] && exit 0
$PY -m sdstudio.train.gpu_report "$OUT_DIR" | tee "$OUT_DIR/table.txt"
echo "total: $(( $(date +%s) - T0 )) s; results in $OUT_DIR"
