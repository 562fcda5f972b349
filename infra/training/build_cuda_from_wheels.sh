#!/usr/bin/env bash
# Builds `llm` with `--features cuda` on a Linux x86_64 machine that has neither the CUDA toolkit
# nor a GPU, for a GPU machine that has CUDA 13's libraries but no Rust:
#
#   infra/training/build_cuda_from_wheels.sh [COMPUTE_CAP]     (default 90: H100/H200)
#   → infra/.work/cuda/target/release/llm
#
# nvcc 13.0 and the headers candle's kernels need come from NVIDIA's wheels on PyPI. candle's CUDA
# backend links the driver, cuBLAS and cuRAND when it is built (cudarc's `dynamic-linking`): stand-ins
# with the real libraries' sonames, made from cudarc's own list of the functions it binds, satisfy the
# linker, and the GPU machine's libraries are what runs (put their folders on LD_LIBRARY_PATH; a
# PyTorch install for CUDA 13 carries them under site-packages/nvidia/cu13/lib). The binary needs a
# driver for CUDA 13.0 or later. With the toolkit installed, build as README *GPU builds* says.
set -euo pipefail
cd "$(dirname "$0")/../.."
CAP="${1:-90}"
W="$PWD/infra/.work/cuda"
CUDA="$W/toolkit/nvidia/cu13"

mkdir -p "$W/wheels"
"${PYTHON:-python3}" -m pip download --no-deps --quiet --dest "$W/wheels" 'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-runtime==13.0.*' \
    'nvidia-cuda-crt==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-cccl==13.0.*'
for wheel in "$W"/wheels/*.whl; do unzip -q -o "$wheel" -d "$W/toolkit"; done
ln -sf libcudart.so.13 "$CUDA/lib/libcudart.so"

cargo fetch --locked
cudarc_version=$(grep -A1 '^name = "cudarc"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_version" | head -1)
mkdir -p "$CUDA/lib/stubs"
# MODULE (cudarc's src/MODULE/sys) LIBRARY SONAME
stub() {
    grep -o -E 'pub unsafe fn [A-Za-z_0-9]+' "$cudarc/src/$1/sys/mod.rs" | awk '{print "void " $4 "(void) {}"}' | sort -u > "$CUDA/lib/stubs/$2.c"
    cc -shared -fPIC -Wl,-soname,"$3" -o "$CUDA/lib/stubs/lib$2.so" "$CUDA/lib/stubs/$2.c"
}
stub driver cuda libcuda.so.1
stub cublas cublas libcublas.so.13
stub cublaslt cublasLt libcublasLt.so.13
stub curand curand libcurand.so.10
stub nvrtc nvrtc libnvrtc.so.13

PATH="$CUDA/bin:$PATH" CUDA_HOME="$CUDA" CUDA_COMPUTE_CAP="$CAP" CARGO_TARGET_DIR="$W/target" \
    cargo build --release --locked --features cuda --bin llm
echo "built $W/target/release/llm (needs on the GPU machine: $(readelf -d "$W/target/release/llm" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | grep -E 'cu' | paste -sd' '))"
