#!/usr/bin/env bash
# On the GPU box (device tool): build benchmarks/fused_expand/fused_expand.cu against CUTLASS's headers
# and run it (its arguments: token counts, default 1024 4096). The box cannot pip install: the headers
# come from the nvidia-cutlass wheel that scripts/prepare_carry.sh puts under .whl/cutlass (carry it),
# or from CUTLASS_DIR (a folder with include/ and tools/util/include/). Output under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
source scripts/cutlass_dir.sh
[ -n "${CUTLASS_DIR:-}" ] || { echo "gpu_fused_expand: no .whl/cutlass/nvidia_cutlass-*.whl (scripts/prepare_carry.sh) and no CUTLASS_DIR" >&2; exit 2; }
# cuBLAS: the toolkit's, else the one pip installed beside torch (nvidia/cu*/{include,lib})
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
BLAS=(-lcublas)
if [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
  inc=$(python3 -c "import glob, nvidia, os; print(next(iter(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], 'cu*', 'include')))), ''))")
  [ -n "$inc" ] && BLAS=(-I"$inc" -L"$(dirname "$inc")/lib" -l:"$(cd "$(dirname "$inc")/lib" && ls libcublas.so.* | head -1)" -Xlinker -rpath="$(dirname "$inc")/lib")
fi
t0=$(date +%s)
"${NVCC:-$CUDA_HOME/bin/nvcc}" -std=c++17 -O3 -DNDEBUG -arch=sm_90a --expt-relaxed-constexpr \
  -I"$CUTLASS_DIR/include" -I"$CUTLASS_DIR/tools/util/include" benchmarks/fused_expand/fused_expand.cu "${BLAS[@]}" \
  -o /tmp/fused_expand > "$OUT/fused_expand_build.log" 2>&1 || { tail -30 "$OUT/fused_expand_build.log"; exit 1; }
echo "fused_expand built in $(( $(date +%s) - t0 )) s"
# under a timeout: a TMA / barrier mistake in the mainloop would hang
timeout "${FUSED_TIMEOUT:-180}" /tmp/fused_expand "$@" 2>&1 | tee "$OUT/fused_expand.txt"
