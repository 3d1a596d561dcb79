#!/usr/bin/env bash
# Download, on a networked machine, the wheels `make gpu-check` needs on an offline GPU machine (the lent ones:
# python3.12, torch 2.11, triton 3.6, pytest, numpy, matplotlib, psutil, einops, tqdm ... already there):
#   .whl/            deepspeed (its pure-Python wheel, built here) and what it needs that the image lacks, torchao
#                    (FP8 run of the model benchmark); about 12 MB. Carry it with every gpu-check call.
#   .whl-quack/      QuACK's RMSNorm (quack-kernels) and its CUTLASS DSL and TVM-FFI, the norm baseline torch 2.13
#                    uses on sm_90 (torch 2.11 has no QuACK: no torch/_native, no torch/_vendor/quack). Its CUDA 13
#                    library wheel is 92 MB, over what one device call carries (64 MiB), so it is cut in two:
#                    .whl-quack/a (54 MiB, carried by a first call) and .whl-quack/b (the rest and the small wheels,
#                    carried with the main call); gpu_check.sh joins them when both are there (a warm machine keeps
#                    the first call's files). Versions pinned in requirements/gpu-bench.txt.
# Everything here is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${GPU_PYTHON_VERSION:-3.12}"
ABI="cp${PY_VERSION/./}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
download() {  # dest, requirement...
  local dest=$1
  shift
  python3 -m pip download -q --dest "$dest" --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --abi "$ABI" --abi abi3 --abi none "${PLATFORMS[@]}" "$@"
}
# Versions from requirements/lock.txt (what CI runs) and requirements/gpu-bench.txt (the GPU-only baselines).
pin() { grep -ih "^$1==" requirements/lock.txt requirements/gpu-bench.txt | head -1 || echo "$1"; }

rm -rf .whl .whl-quack
mkdir -p .whl .whl-quack/a .whl-quack/b
# deepspeed is a source package: build its pure-Python wheel here (no ops), then what the GPU image lacks of its needs.
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --wheel-dir .whl "$(pin deepspeed)"
download .whl "$(pin hjson)" "$(pin pydantic)" "$(pin pydantic-core)" "$(pin annotated-types)" \
  "$(pin typing-inspection)" "$(pin torchao)"

download .whl-quack/b "$(pin quack-kernels)" "$(pin nvidia-cutlass-dsl)" "$(pin nvidia-cutlass-dsl-libs-base)" \
  "$(pin nvidia-cutlass-dsl-libs-core)" "$(pin apache-tvm-ffi)" "$(pin torch-c-dlpack-ext)"
download .whl-quack "$(pin nvidia-cutlass-dsl-libs-cu13)"
big=$(ls .whl-quack/nvidia_cutlass_dsl_libs_cu13-*.whl)
(cd .whl-quack && sha256sum "$(basename "$big")" > b/wheel.sha256)  # gpu_check.sh checks the joined wheel with it
split -b 54M -d "$big" ".whl-quack/part-"
mv .whl-quack/part-00 .whl-quack/a/"$(basename "$big")".part-00
mv .whl-quack/part-01 .whl-quack/b/"$(basename "$big")".part-01
rm "$big"
du -sh .whl .whl-quack/a .whl-quack/b
ls -1 .whl .whl-quack/a .whl-quack/b
