// Top-k selection and softmax of one token's gate logits: the one definition the CPU kernels and
// the CUDA kernels share (DESIGN.md section 1). No torch headers: nvcc compiles it fast.
#pragma once
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define METEORA_HD __host__ __device__ __forceinline__
#else
#define METEORA_HD inline
#endif

namespace meteora {

constexpr int kMaxExperts = 64;  // N
constexpr int kMaxTopK = 8;      // k
constexpr int kMaxRank = 64;     // r

METEORA_HD float exp_of(float v) { return expf(v); }
METEORA_HD double exp_of(double v) { return exp(v); }

// logits: `experts` values with stride `stride`; mask: nullptr or experts bools (false = absent,
// counted as -inf). Writes idx[0..k) in descending logit order, ties toward the lower index, and
// weight[0..k) = softmax(selected / temperature); when every expert is masked all weights are 0.
template <typename acc_t, typename logit_t>
METEORA_HD void topk_softmax(const logit_t* logits, int64_t stride, const bool* mask, int experts,
                             int top_k, acc_t temperature, acc_t* weight, int64_t* idx) {
  const acc_t neg_inf = static_cast<acc_t>(-INFINITY);
  uint64_t taken = 0;  // experts <= 64
  acc_t selected[8];   // top_k <= 8
  for (int j = 0; j < top_k; ++j) {
    int best = -1;
    acc_t best_value = neg_inf;
    for (int e = 0; e < experts; ++e) {
      if ((taken >> e) & 1u) continue;
      const acc_t v = (mask == nullptr || mask[e]) ? static_cast<acc_t>(logits[e * stride]) : neg_inf;
      if (best < 0 || v > best_value) {  // strictly greater: the lower index wins ties
        best = e;
        best_value = v;
      }
    }
    taken |= uint64_t(1) << best;
    selected[j] = best_value;
    idx[j] = best;
  }
  const acc_t top = selected[0];  // -inf only when every expert is masked
  acc_t denom = 0;
  for (int j = 0; j < top_k; ++j) {
    selected[j] = (top == neg_inf) ? acc_t(0) : exp_of((selected[j] - top) / temperature);
    denom += selected[j];
  }
  for (int j = 0; j < top_k; ++j) weight[j] = denom > 0 ? selected[j] / denom : acc_t(0);
}

}  // namespace meteora
