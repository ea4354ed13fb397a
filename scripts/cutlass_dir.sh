# Sourced by scripts/gpu_check.sh and scripts/gpu_fused_expand.sh on the GPU box, which cannot pip
# install: unless CUTLASS_DIR is set already, unpacks the nvidia-cutlass wheel that
# scripts/prepare_carry.sh puts under .whl/cutlass (carry it) and exports CUTLASS_DIR (a folder with
# include/ and tools/util/include/). Without either, CUTLASS_DIR stays unset.
if [ -z "${CUTLASS_DIR:-}" ] && ls .whl/cutlass/nvidia_cutlass-*.whl > /dev/null 2>&1; then
  rm -rf /tmp/cutlass_wheel && python3 -m zipfile -e "$(ls .whl/cutlass/nvidia_cutlass-*.whl | head -1)" /tmp/cutlass_wheel
  export CUTLASS_DIR=/tmp/cutlass_wheel/cutlass_library/source
fi
