// Launchers of the tensor-core kernels (csrc/cuda/grouped.cu) for fp16 / bf16. Plain C++ so that
// the .cu file needs no torch header (it compiles in seconds). Every pointer is device memory;
// every launch goes to `stream` and never synchronises, so CUDA graphs can capture it.
//
// Shapes: T tokens, k slots per token, N experts, r padded rank (lora_a (N, r, d_in) and
// lora_b (N, d_out, r) contiguous), pairs p = t * k + j, idx (T, k) int64.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace meteora::cuda {

enum class Half16 { kFloat16, kBFloat16 };

// 16-byte aligned (one vector load / store, TMA's global address).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Top-k + softmax of fp32 logits (T, N), one thread per token.
void topk(const float* logits, const bool* mask, int64_t tokens, int experts, int top_k,
          float temperature, float* weight, int64_t* idx, cudaStream_t stream);

// hidden (T, k, r) fp32 = A[idx] x. x rows have stride x_ld (elements), unit column stride.
void shrink(Half16 dt, const void* x, int64_t x_ld, int64_t tokens, int64_t d_in, const void* lora_a,
            int experts, int rank, const int64_t* idx, int top_k, float* hidden, cudaStream_t stream);

// Backward of the expand: bt = B[idx]^T g (the same grouped GEMM over the selected experts);
// grad_h (T, k, r) = w s bt (+ grad_hidden); grad_w (T, k) = s <bt, hidden> (if not null).
void shrink_backward(Half16 dt, const void* grad_out, int64_t tokens, int64_t d_out,
                     const void* lora_b, int experts, int rank, const int64_t* idx, int top_k,
                     const float* weight, const float* scaling, const float* hidden,
                     const float* grad_hidden, float* grad_h, float* grad_w, cudaStream_t stream);

// out (T, D) = base + sum_j coef_j P[t, j, :] W[e_j]: grouped over the experts that the tokens of
// each 64-token tile selected. coef = weight * scaling[e] when both are given, else 1.
// transposed = false: W[e] is lora_b[e] (D, r) (forward); true: W[e] is lora_a[e] (r, D) (grad x).
// base (T, D) with row stride base_ld, or nullptr.
void expand(Half16 dt, const float* P, const int64_t* idx, int top_k, int64_t tokens,
            const float* weight, const float* scaling, const void* w, bool transposed, int experts,
            int rank, int64_t d, const void* base, int64_t base_ld, void* out, cudaStream_t stream);

// For the dense path (small N r, many tokens): hall (T, N r) fp32 = x A_all^T from one GEMM;
// hidden (T, k, r) = each pair's slice; H (T, N r) in x's dtype = w s hall at the selected experts,
// 0 elsewhere (the left operand of the expand GEMM H B_all^T).
void select_dense(Half16 dt, const float* hall, const int64_t* idx, const float* weight, const float* scaling,
                  int64_t tokens, int experts, int rank, int top_k, float* hidden, void* H, cudaStream_t stream);

// Backward of the dense path: bt (T, N r) fp32 = grad_out B_all; grad_h (T, k, r) = w s bt (+ grad_hidden);
// grad_w (T, k) = s <bt, hidden> (if not null); GH, H (T, N r) in x's dtype = grad_h and w s hidden
// at the selected experts, 0 elsewhere.
void select_dense_backward(Half16 dt, const float* bt, const int64_t* idx, const float* weight,
                           const float* scaling, const float* hidden, const float* grad_hidden, int64_t tokens,
                           int experts, int rank, int top_k, float* grad_h, float* grad_w, void* GH, void* H,
                           cudaStream_t stream);

// Stable counting sort of the T*k pairs by expert: perm[offsets[e] .. offsets[e+1]) are expert e's
// pairs in increasing order. One block; no host sync.
void sort_pairs(const int64_t* idx, int64_t pairs, int experts, int* perm, int* offsets,
                cudaStream_t stream);

// Weight gradients, one expert at a time over its sorted pairs, accumulated in fp32 `acc`
// (zeroed by the caller): lora_a: acc (N, r, D) += grad_h^T R (R = x, D = d_in);
// lora_b (transposed): acc (N, D, r) += R^T (w s hidden) (R = grad_out, D = d_out).
// R rows have stride r_ld.
void pair_outer(Half16 dt, const int* perm, const int* offsets, int64_t pairs, int experts,
                int rank, int top_k, const float* L, const float* weight, const float* scaling,
                const void* R, int64_t r_ld, int64_t d, bool transposed, float* acc,
                cudaStream_t stream);

// meteora.linear's inference path. hall (T, ld) fp32 rows = [N gate logits | N r expert shrink
// values]; both route each token as topk() does and write logits (T, N), weight, idx (T, k).
// route_expand (decode-sized T): delta (T, d_out) fp32 = the selected experts' expand (lora_b
// element [e, n, c] at e b_es + n b_ns + c), for one or several linears that read the same tokens
// (a LinearGroup's members: one launch per kMaxRoutePieces); add_delta then adds it into out in
// place, for one or several (out, delta) pieces in one launch per kMaxDeltaPieces (count = T d_out
// values, contiguous; pieces of count 0 are skipped).
// With `out` set (the stacked decode path, one GEMM of x with [W0_1; ...; gate_1; A_1; ...]), the
// piece writes out (T, d_out) in x's dtype = base + bias + the experts' sum, one rounding, where
// base is this linear's first column of the same fp32 rows (ld apart) and bias (d_out) may be
// null; delta is then unused.
struct RoutePiece {
  const float* hall;  // this linear's first column of hall; rows ld apart
  int64_t ld;
  const bool* mask;   // (N) or nullptr
  int experts, rank, top_k;
  float temperature;
  const float* scaling;
  const void* lora_b;
  int64_t b_es, b_ns, d_out;
  float* delta;
  float* logits;
  float* weight;
  int64_t* idx;
  const float* base = nullptr;
  const void* bias = nullptr;
  void* out = nullptr;
  void* H = nullptr;  // route_select's output
  int64_t ldh = 0;
};
constexpr int kMaxRoutePieces = 4;  // per launch
void route_expand(Half16 dt, const RoutePiece* pieces, int n, int64_t tokens, cudaStream_t stream);
struct DeltaPiece {
  void* out;
  const float* delta;
  int64_t count;
};
constexpr int kMaxDeltaPieces = 8;  // per launch
void add_delta(Half16 dt, const DeltaPiece* pieces, int n, cudaStream_t stream);
// dst[t, :cols] = src[t, :cols] for rows of 2-byte elements, ldd / lds elements apart.
void copy_rows(void* dst, int64_t ldd, const void* src, int64_t lds, int64_t rows, int64_t cols,
               cudaStream_t stream);
// route_select (larger T): for the same pieces (a LinearGroup's members, kMaxRoutePieces a launch),
// routes every token and writes the piece's row H (T, N r), rows ldh apart, in x's dtype = w s hall
// at the selected experts, 0 elsewhere (plus logits, weight and idx; lora_b, delta and out unused).
void route_select(Half16 dt, const RoutePiece* pieces, int n, int64_t tokens, cudaStream_t stream);

}  // namespace meteora::cuda
