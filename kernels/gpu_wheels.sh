#!/usr/bin/env bash
# Download, on a networked machine, the wheels that `make gpu-check` needs on an offline GPU machine
# (python3.12 with torch and triton, nothing else): pytest for the GPU tests, matplotlib for the plot,
# deepspeed with its dependencies for the whole-model benchmark (scripts/bench_model.py), and torchao for its FP8 run.
# They land in .whl/ (git-ignored); carry that folder with the tree. gpu_check.sh installs from it
# only what the GPU machine's python lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${GPU_PYTHON_VERSION:-3.12}"
ABI="cp${PY_VERSION/./}"
mkdir -p .whl
# Versions from requirements/lock.txt, so the GPU check runs what CI runs.
pin() { grep -i "^$1==" requirements/lock.txt || echo "$1"; }
python3 -m pip download -q --dest .whl --only-binary=:all: \
  --python-version "$PY_VERSION" --implementation cp --abi "$ABI" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  "$(pin pytest)" "$(pin pytest-timeout)" "$(pin matplotlib)" "$(pin numpy)"
# deepspeed is a source package: build its pure-Python wheel here (no ops), then its dependencies.
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --wheel-dir .whl "$(pin deepspeed)"
python3 -m pip download -q --dest .whl --no-deps --only-binary=:all: \
  --python-version "$PY_VERSION" --implementation cp --abi "$ABI" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  "$(pin hjson)" "$(pin msgpack)" "$(pin ninja)" "$(pin psutil)" "$(pin py-cpuinfo)" "$(pin einops)" "$(pin tqdm)" \
  "$(pin pydantic)" "$(pin pydantic-core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
  "$(pin typing-extensions)" "$(pin packaging)" "$(pin safetensors)" "$(pin torchao)"
ls -1 .whl
du -sh .whl
