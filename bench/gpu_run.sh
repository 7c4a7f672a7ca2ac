#!/usr/bin/env bash
# The GPU run of issue 10, as one command on a machine with an NVIDIA GPU and its own torch:
#   bash bench/gpu_run.sh tests|throughput|all [extra args for bench/throughput.py]
# Packages that machine lacks (deepspeed and its needs) come as wheels in .whl/ (see docs/performance.md).
set -euo pipefail
stage=${1:-all}; shift || true
out=${OUT:-/tmp/horizon-gpu}; mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || echo "native AdamW not built: see build.log"
python3 -c "import torch, os; print(torch.__version__, torch.cuda.get_device_name(0), os.cpu_count(), 'cores')"
if [[ $stage == tests || $stage == all ]]; then
  python3 -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" || true
fi
if [[ $stage == throughput || $stage == all ]]; then
  python3 bench/throughput.py --out "$out/throughput.json" "$@" 2>&1 | tee "$out/throughput.log"
fi
