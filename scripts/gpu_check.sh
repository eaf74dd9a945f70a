#!/usr/bin/env bash
# One-shot check of the fast path on a lent GPU (made for one H200 with no network).
#
#   bash scripts/gpu_check.sh append .dev/part-NN   # one call per data part, in order
#   bash scripts/gpu_check.sh verify                # unpack and check the data only
#   bash scripts/gpu_check.sh run [FIT FLAGS...]    # unpack, verify, install wheels, train
#
# `run` trains `fit run --bs 256 --epochs 30 --compile` on the real CIFAR-100 (bf16, channels
# last, data on the GPU) and prints wall time, compile time, images/s, top-1, top-5 and the GPU
# name. The training is cut off after 420 s, so the whole command ends within 8 minutes.
# README ("GPU check") gives the sequence of device calls; scripts/prepare_device.sh makes the
# wheels (.whl/) and data parts (.dev/) it carries.
set -uo pipefail
cd "$(dirname "$0")/.."
work=${GPU_CHECK_WORK:-/tmp/cifar100_fit}
mkdir -p "$work"

# sha256 of the three files, from the data folder's README (shared/data/cifar100/README.md)
sums="9bc677e832a0b1e16b616ba2ef8d5d3f52a92d6e84985f2355e819eff52e0f97  cifar-100-python/train
842b069e5019154474e6e0c41d0b599701287d307589c1bd2886208d1a953e81  cifar-100-python/test
a5d4786345c961390f865e93b434dbd5c6904ce880667e0cb888c97d449f28b9  cifar-100-python/meta"

append() {
  local part=$1 name
  name=$(basename "$part")
  [[ -f "$part" ]] || { echo "gpu_check: $part is missing; carry it with this call" >&2; exit 2; }
  if grep -qx "$name" "$work/parts.txt" 2>/dev/null; then
    echo "gpu_check: $name was appended already; carry the next part" >&2
    exit 2
  fi
  cat "$part" >>"$work/data.tar" && echo "$name" >>"$work/parts.txt"
  echo "appended $name: data.tar is $(stat -c %s "$work/data.tar") bytes," \
    "parts so far: $(paste -sd' ' "$work/parts.txt")"
}

unpack() {
  if [[ ! -f "$work/data/cifar-100-python/train" ]]; then
    [[ -f "$work/data.tar" ]] || { echo "gpu_check: no data; run the append calls first" >&2; exit 2; }
    mkdir -p "$work/data" && tar -C "$work/data" -xf "$work/data.tar" || {
      echo "gpu_check: data.tar does not unpack; were all parts appended in order?" >&2; exit 3; }
  fi
  (cd "$work/data" && echo "$sums" | sha256sum --check --quiet) || {
    echo "gpu_check: the data differ from the README's sha256 sums" >&2; exit 3; }
  echo "data: cifar-100-python unpacked and checked against the README's sha256 sums"
}

install_wheels() {
  export PYTHONPATH="$PWD"
  if python3 -c "import cifar100_fit.train, fire" 2>/dev/null; then return; fi  # a rehearsal here
  ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check: no .whl/; carry it with this call" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 4
  export PYTHONPATH="$PWD:/tmp/site"
  python3 -c "import cifar100_fit.train, fire" || {
    echo "gpu_check: an import failed (above); add that package to prepare_device.sh" >&2; exit 4; }
}

report() {
  python3 - "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{s['device']}: {s['epochs']} epochs in {s['wall_s']:.1f} s wall (+{s['compile_s']:.1f} s compile), "
      f"{s['images_per_s']:.0f} images/s, top-1 {s['accuracy']:.2%}, top-5 {s['top5_accuracy']:.2%}, "
      f"best top-1 {s['best_accuracy']:.2%}")
PY
}

run() {
  local started=$SECONDS out
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  unpack && install_wheels
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU')"
  out="$work/run-$(date +%s)"
  export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
  # GPU_CHECK_BS / GPU_CHECK_EPOCHS / GPU_CHECK_SUBSET exist for a short rehearsal on a CPU
  timeout 420 python3 -m cifar100_fit run --data "$work/data" --bs "${GPU_CHECK_BS:-256}" \
    --epochs "${GPU_CHECK_EPOCHS:-30}" --subset "${GPU_CHECK_SUBSET:-1}" --compile \
    --wandb disabled --out "$out" "$@" 2>&1 | tee "$work/fit.log" | tr '\r' '\n' | grep -v '|'
  local status=${PIPESTATUS[0]}
  if [[ -n "${OUT:-}" ]]; then cp "$work/fit.log" "$out"/*.json "$OUT"/ 2>/dev/null; fi
  [[ $status -eq 0 && -f "$out/summary.json" ]] || {
    echo "gpu_check: fit run ended with status $status (124: cut off at 420 s)" >&2; exit 5; }
  report "$out/summary.json"
  echo "gpu_check: whole command $((SECONDS - started)) s"
}

case "${1:-}" in
  append) shift; for part in "$@"; do append "$part"; done ;;
  verify) unpack ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash scripts/gpu_check.sh append PART... | verify | run [FIT FLAGS]" >&2; exit 2 ;;
esac
