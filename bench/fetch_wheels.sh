#!/usr/bin/env bash
# Wheels for a GPU machine that has torch but cannot reach PyPI: DeepSpeed (the throughput baseline) and the
# packages it needs beyond that machine's image, for CPython 3.12 on x86-64. Run here (with network), then
# carry .whl/ to the GPU machine; bench/gpu_run.sh installs them. .whl/ is ignored by git.
set -euo pipefail
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hjson==3.1.0 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types typing-inspection "pulp>=3.3,<4"
python3 -m pip wheel --no-deps -w .whl deepspeed==0.19.8   # an sdist: built into a pure-Python wheel
ls -la .whl
