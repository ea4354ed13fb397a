// The prefill expand inside the base GEMM on Hopper (csrc/sm90/fused_expand.cu, built when CUTLASS's
// headers are found and the build targets sm_90):
//
//   out (T, d_out) = x (T, d_in) W0^T + H (T, N r) B_all^T
//
// one GEMM whose k-tiles run over [x | H] against [W0 | B_all] without either being concatenated in
// memory, rounded to out's dtype once. Without that build the functions below report it absent.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace meteora::cuda {

// Row-major operands (elements, leading dimensions in elements), fp16 or bf16 throughout.
struct FusedExpandArgs {
  int64_t tokens = 0, d_out = 0, d_in = 0, nr = 0;
  const void* x = nullptr;
  int64_t ldx = 0;
  const void* w0 = nullptr;  // (d_out, d_in) rows
  int64_t ldw = 0;
  const void* h = nullptr;  // (T, N r)
  int64_t ldh = 0;
  const void* b = nullptr;  // B_all (d_out, N r) rows
  int64_t ldb = 0;
  void* out = nullptr;  // (T, d_out)
  int64_t ldo = 0;
  bool half = false;  // fp16, else bf16
  int sm_count = 0;
};

#ifdef METEORA_WITH_FUSED_EXPAND
// Whether the kernel can take these operands (16-byte aligned pointers and rows, d_in, N r and d_out
// multiples of 8, sizes within int); the workspace it needs; the launch (false: nothing launched).
bool fused_expand_supported(const FusedExpandArgs& a);
size_t fused_expand_workspace(const FusedExpandArgs& a);
bool fused_expand(const FusedExpandArgs& a, void* workspace, cudaStream_t stream);
#else
inline bool fused_expand_supported(const FusedExpandArgs&) { return false; }
inline size_t fused_expand_workspace(const FusedExpandArgs&) { return 0; }
inline bool fused_expand(const FusedExpandArgs&, void*, cudaStream_t) { return false; }
#endif

}  // namespace meteora::cuda
