// Tensor-core kernels of the meteora ops for fp16 / bf16 (launchers declared in grouped.h).
//
// The LoRA experts are grouped GEMMs that never copy a weight per token:
//  * shrink (hidden = A[e] x): a 32- or 64-token tile gathers the experts its tokens selected
//    (their union, at most 256 rank rows at a time), runs one tensor-core GEMM over d_in with a
//    3-stage cp.async pipeline, and keeps only each token's own (token, expert) outputs;
//  * expand (out = base + sum_j w_j s B[e_j] h_j): a 64 x 128 output tile builds its left operand
//    (64 tokens x union rank rows, zero where a token did not pick the expert) in shared memory
//    from the fp32 hidden values, so memory stays O(T (N + k r));
//  * weight gradients: pairs sorted by expert (stable counting sort on the GPU), one block per
//    (expert, 128 columns, 512 pairs) accumulating grad_h^T x or g^T (w s h) in fp32.
// Decode-sized inputs (T k <= 64) use a SIMT shrink that spreads d_in over a whole block.
// Accumulation is fp32 throughout (WMMA 16x16x16, fp32 accumulators).
#include "grouped.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "../topk.h"

namespace meteora::cuda {
namespace {

using namespace nvcuda;

constexpr int kThreads = 256;  // 8 warps
constexpr int BK = 32;        // reduction step
constexpr int LDK = BK + 8;   // shared-memory pitch along K (elements); keeps wmma pointers aligned
constexpr int kStages = 3;    // cp.async pipeline depth of the shrink

template <typename h_t>
__device__ __forceinline__ float to_f(h_t v);
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename h_t>
__device__ __forceinline__ h_t from_f(float v);
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int n>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(n)); }

// The experts that the tokens [m0, m0 + rows) selected, in increasing order, and for each token
// the slot holding each of them (slot[t * 64 + u] = j, or -1). Call with all threads.
struct TileUnion {
  int count;
  int expert[kMaxExperts];
  int8_t* slot;  // rows x 64
};

__device__ void build_union(const int64_t* __restrict__ idx, int64_t tokens, int top_k, int experts,
                            int64_t m0, int rows, unsigned long long* s_bits, int* s_pos,
                            TileUnion* u) {
  if (threadIdx.x == 0) *s_bits = 0ull;
  for (int q = threadIdx.x; q < rows * kMaxExperts; q += blockDim.x) u->slot[q] = -1;
  __syncthreads();
  for (int q = threadIdx.x; q < rows * top_k; q += blockDim.x) {
    const int64_t t = m0 + q / top_k;
    if (t < tokens) {
      const int64_t e = idx[t * top_k + q % top_k];
      if (e >= 0 && e < experts) atomicOr(s_bits, 1ull << e);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long bits = *s_bits;
    int n = 0;
    while (bits) {
      const int e = __ffsll(static_cast<long long>(bits)) - 1;
      bits &= bits - 1;
      s_pos[e] = n;
      u->expert[n++] = e;
    }
    u->count = n;
  }
  __syncthreads();
  for (int q = threadIdx.x; q < rows * top_k; q += blockDim.x) {
    const int64_t t = m0 + q / top_k;
    if (t < tokens) {
      const int64_t e = idx[t * top_k + q % top_k];
      if (e >= 0 && e < experts) u->slot[(q / top_k) * kMaxExperts + s_pos[e]] = static_cast<int8_t>(q % top_k);
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Shrink: C (BM tokens x union rank rows) = X (BM x K) W^T, W rows = the rank rows of the tile's
// experts. Forward: X = x, W row (e, c) = lora_a[e, c, :] (K contiguous: column-major operand).
// Backward: X = grad_out, W row (e, c) = lora_b[e, :, c] (stride r: row-major operand, loaded
// 8 rank columns at a time).
template <typename h_t, int BM, bool kBackward, bool kVec>
struct ShrinkTile {
  static constexpr int BN = 256;                      // rank rows per pass
  static constexpr int WARPS_M = BM / 16;             // 4 or 2
  static constexpr int WARPS_N = 8 / WARPS_M;         // 2 or 4
  static constexpr int WN = BN / WARPS_N;             // columns per warp
  static constexpr int FN = WN / 16;                  // fragments per warp
  static constexpr int LDW = kBackward ? BN + 8 : LDK;
  static constexpr int X_ELEMS = BM * LDK;
  static constexpr int W_ELEMS = kBackward ? BK * (BN + 8) : BN * LDK;
  static constexpr int STAGE_ELEMS = X_ELEMS + W_ELEMS;
  static constexpr size_t kSmem = size_t(kStages) * STAGE_ELEMS * sizeof(h_t) + 8 * 256 * sizeof(float) +
                                  size_t(BM) * kMaxExperts + size_t(BM) * kMaxTopK * sizeof(float);
};

struct ShrinkParams {
  const void* x;
  int64_t x_ld, tokens, K;
  const void* w;
  int experts, rank, top_k;
  const int64_t* idx;
  float* hidden;  // forward output
  // backward
  const float *weight, *scaling, *hidden_in, *grad_hidden;
  float *grad_h, *grad_w;
};

template <typename h_t, int BM, bool kBackward, bool kVec>
__global__ void __launch_bounds__(kThreads) shrink_tile_kernel(ShrinkParams p) {
  using Cfg = ShrinkTile<h_t, BM, kBackward, kVec>;
  using BLayout = std::conditional_t<kBackward, wmma::row_major, wmma::col_major>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  h_t* stages = reinterpret_cast<h_t*>(smem_raw);
  float* scratch = reinterpret_cast<float*>(smem_raw + size_t(kStages) * Cfg::STAGE_ELEMS * sizeof(h_t));
  int8_t* slot = reinterpret_cast<int8_t*>(scratch + 8 * 256);
  float* s_gw = reinterpret_cast<float*>(slot + BM * kMaxExperts);
  __shared__ unsigned long long s_bits;
  __shared__ int s_pos[kMaxExperts];
  __shared__ TileUnion tu;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp % Cfg::WARPS_M, wn = warp / Cfg::WARPS_M;
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int r = p.rank, k = p.top_k;
  const int64_t K = p.K;
  const h_t* X = static_cast<const h_t*>(p.x);
  const h_t* W = static_cast<const h_t*>(p.w);
  if (threadIdx.x == 0) tu.slot = slot;
  __syncthreads();
  build_union(p.idx, p.tokens, k, p.experts, m0, BM, &s_bits, s_pos, &tu);
  if constexpr (kBackward) {
    for (int q = threadIdx.x; q < BM * kMaxTopK; q += blockDim.x) s_gw[q] = 0.f;
  }
  const int per_pass = Cfg::BN / r;  // experts per pass (r <= 64, so >= 4)
  const int nk = static_cast<int>((K + BK - 1) / BK);

  for (int u0 = 0; u0 < tu.count; u0 += per_pass) {
    const int ue = min(per_pass, tu.count - u0);
    const int ncols = ue * r;
    const int ncols16 = (ncols + 15) & ~15;

    auto load_stage = [&](int stage, int64_t k0) {
      h_t* xs = stages + stage * Cfg::STAGE_ELEMS;
      h_t* ws = xs + Cfg::X_ELEMS;
      // X tile: BM rows x BK, 8 elements per chunk.
      for (int q = threadIdx.x; q < BM * (BK / 8); q += kThreads) {
        const int row = q / (BK / 8), seg = (q % (BK / 8)) * 8;
        const int64_t t = m0 + row, kk = k0 + seg;
        h_t* dst = xs + row * LDK + seg;
        if constexpr (kVec) {
          const bool ok = t < p.tokens && kk < K;
          cp_async16(dst, ok ? X + t * p.x_ld + kk : X, ok);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i)
            dst[i] = (t < p.tokens && kk + i < K) ? X[t * p.x_ld + kk + i] : from_f<h_t>(0.f);
        }
      }
      if constexpr (!kBackward) {
        // W^T column-major: ws[col * LDK + kk] = A[e, c, k0 + kk].
        for (int q = threadIdx.x; q < ncols16 * (BK / 8); q += kThreads) {
          const int col = q / (BK / 8), seg = (q % (BK / 8)) * 8;
          const int64_t kk = k0 + seg;
          h_t* dst = ws + col * LDK + seg;
          const bool in = col < ncols;
          const int e = in ? tu.expert[u0 + col / r] : 0;
          const h_t* src = W + (int64_t(e) * r + (in ? col % r : 0)) * K + kk;
          if constexpr (kVec) {
            const bool ok = in && kk < K;
            cp_async16(dst, ok ? src : W, ok);
          } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) dst[i] = (in && kk + i < K) ? src[i] : from_f<h_t>(0.f);
          }
        }
      } else {
        // W^T row-major: ws[kk * LDW + col] = B[e, k0 + kk, c]; 8 rank columns per chunk.
        for (int q = threadIdx.x; q < BK * (ncols16 / 8); q += kThreads) {
          const int kk = q / (ncols16 / 8), col = (q % (ncols16 / 8)) * 8;
          const int64_t kg = k0 + kk;
          h_t* dst = ws + kk * Cfg::LDW + col;
          if constexpr (kVec) {  // r % 8 == 0: the 8 columns belong to one expert
            const bool ok = col < ncols && kg < K;
            const int e = ok ? tu.expert[u0 + col / r] : 0;
            cp_async16(dst, ok ? W + (int64_t(e) * K + kg) * r + col % r : W, ok);
          } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              const int c = col + i;
              h_t v = from_f<h_t>(0.f);
              if (c < ncols && kg < K) v = W[(int64_t(tu.expert[u0 + c / r]) * K + kg) * r + c % r];
              dst[i] = v;
            }
          }
        }
      }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Cfg::FN];
#pragma unroll
    for (int f = 0; f < Cfg::FN; ++f) wmma::fill_fragment(acc[f], 0.f);

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < nk) load_stage(s, int64_t(s) * BK);
      cp_async_commit();
    }
    for (int kt = 0; kt < nk; ++kt) {
      cp_async_wait<kStages - 2>();
      __syncthreads();
      const int next = kt + kStages - 1;
      if (next < nk) load_stage(next % kStages, int64_t(next) * BK);
      cp_async_commit();
      const h_t* xs = stages + (kt % kStages) * Cfg::STAGE_ELEMS;
      const h_t* ws = xs + Cfg::X_ELEMS;
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, h_t, wmma::row_major> a;
        wmma::load_matrix_sync(a, xs + wm * 16 * LDK + kk, LDK);
#pragma unroll
        for (int f = 0; f < Cfg::FN; ++f) {
          const int col = wn * Cfg::WN + f * 16;
          if (col < ncols) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, h_t, BLayout> b;
            if constexpr (kBackward) {
              wmma::load_matrix_sync(b, ws + kk * Cfg::LDW + col, Cfg::LDW);
            } else {
              wmma::load_matrix_sync(b, ws + col * LDK + kk, LDK);
            }
            wmma::mma_sync(acc[f], a, b, acc[f]);
          }
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();

    // Epilogue: each warp spills one 16x16 fragment at a time and keeps the (token, expert)
    // entries the token selected.
    float* sc = scratch + warp * 256;
#pragma unroll
    for (int f = 0; f < Cfg::FN; ++f) {
      const int col0 = wn * Cfg::WN + f * 16;
      if (col0 >= ncols) continue;
      wmma::store_matrix_sync(sc, acc[f], 16, wmma::mem_row_major);
      __syncwarp();
      for (int q = lane; q < 256; q += 32) {
        const int lr = wm * 16 + q / 16, col = col0 + q % 16;
        const int64_t t = m0 + lr;
        if (t >= p.tokens || col >= ncols) continue;
        const int u = u0 + col / r, c = col % r;
        const int j = slot[lr * kMaxExperts + u];
        if (j < 0) continue;
        const float v = sc[q];
        const int64_t pair = t * k + j;
        if constexpr (!kBackward) {
          p.hidden[pair * r + c] = v;
        } else {
          const int e = tu.expert[u];
          const float coef = p.weight[pair] * p.scaling[e];
          p.grad_h[pair * r + c] = v * coef + (p.grad_hidden ? p.grad_hidden[pair * r + c] : 0.f);
          if (p.grad_w) atomicAdd(&s_gw[lr * kMaxTopK + j], v * p.hidden_in[pair * r + c]);
        }
      }
      __syncwarp();
    }
    __syncthreads();
  }
  if constexpr (kBackward) {
    if (p.grad_w) {
      for (int q = threadIdx.x; q < BM * k; q += kThreads) {
        const int lr = q / k, j = q % k;
        const int64_t t = m0 + lr;
        if (t >= p.tokens) continue;
        const int64_t e = p.idx[t * k + j];
        const float s = (e >= 0 && e < p.experts) ? p.scaling[e] : 0.f;
        p.grad_w[t * k + j] = s * s_gw[lr * kMaxTopK + j];
      }
    }
  }
}

// Decode-sized shrink: one block per (token, slot) pair, d_in spread over 256 threads.
template <typename h_t, bool kVec>
__global__ void __launch_bounds__(kThreads) shrink_small_kernel(const h_t* __restrict__ x, int64_t x_ld,
                                                                const h_t* __restrict__ a,
                                                                const int64_t* __restrict__ idx, int top_k,
                                                                int experts, int64_t d_in, int rank,
                                                                float* __restrict__ hidden) {
  __shared__ float red[8][8];
  const int64_t pair = blockIdx.x;
  const int64_t e = idx[pair];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const h_t* row = x + (pair / top_k) * x_ld;
  for (int r0 = 0; r0 < rank; r0 += 8) {
    float acc[8] = {};
    if (e >= 0 && e < experts) {
      const h_t* ab = a + (e * rank + r0) * d_in;
      if constexpr (kVec) {
        for (int64_t i = int64_t(threadIdx.x) * 8; i < d_in; i += kThreads * 8) {
          const uint4 xv = *reinterpret_cast<const uint4*>(row + i);
          const h_t* xh = reinterpret_cast<const h_t*>(&xv);
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            if (r0 + c < rank) {
              const uint4 av = *reinterpret_cast<const uint4*>(ab + int64_t(c) * d_in + i);
              const h_t* ah = reinterpret_cast<const h_t*>(&av);
#pragma unroll
              for (int q = 0; q < 8; ++q) acc[c] += to_f(xh[q]) * to_f(ah[q]);
            }
          }
        }
      } else {
        for (int64_t i = threadIdx.x; i < d_in; i += kThreads) {
          const float xv = to_f(row[i]);
#pragma unroll
          for (int c = 0; c < 8; ++c)
            if (r0 + c < rank) acc[c] += xv * to_f(ab[int64_t(c) * d_in + i]);
        }
      }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      float v = acc[c];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) red[warp][c] = v;
    }
    __syncthreads();
    if (threadIdx.x < 8 && r0 + int(threadIdx.x) < rank) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < 8; ++w) v += red[w][threadIdx.x];
      hidden[pair * rank + r0 + threadIdx.x] = v;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Expand: out tile (64 tokens x 128 columns) = base + H W, H (64 x union*r) built in shared memory
// from P (T, k, r) fp32 and coef; W[e] rows: forward lora_b[e][n, :] (K contiguous), grad x
// lora_a[e][:, n] (n contiguous).
constexpr int EBM = 64, EBN = 128, ELDN = EBN + 8, ELDC = EBN + 4;

struct ExpandParams {
  const float* P;
  const int64_t* idx;
  int top_k;
  int64_t tokens;
  const float *weight, *scaling;
  const void* w;
  int experts, rank;
  int64_t d;
  const void* base;
  int64_t base_ld;
  void* out;
};

template <typename h_t, bool kTransposed, bool kVec>
__global__ void __launch_bounds__(kThreads) expand_tile_kernel(ExpandParams p) {
  using BLayout = std::conditional_t<kTransposed, wmma::row_major, wmma::col_major>;
  constexpr int H_ELEMS = EBM * LDK;
  constexpr int W_ELEMS = kTransposed ? BK * ELDN : EBN * LDK;
  constexpr int MAIN_BYTES = (H_ELEMS + W_ELEMS) * int(sizeof(h_t));
  constexpr int C_BYTES = EBM * ELDC * int(sizeof(float));
  __shared__ __align__(128) unsigned char buf[MAIN_BYTES > C_BYTES ? MAIN_BYTES : C_BYTES];
  __shared__ int8_t slot[EBM * kMaxExperts];
  __shared__ float coef[EBM * kMaxTopK];
  __shared__ unsigned long long s_bits;
  __shared__ int s_pos[kMaxExperts];
  __shared__ TileUnion tu;
  h_t* hs = reinterpret_cast<h_t*>(buf);
  h_t* ws = hs + H_ELEMS;
  float* cs = reinterpret_cast<float*>(buf);

  const int warp = threadIdx.x / 32;
  const int wm = warp % 4, wn = warp / 4;
  const int64_t m0 = int64_t(blockIdx.x) * EBM, n0 = int64_t(blockIdx.y) * EBN;
  const int r = p.rank, k = p.top_k;
  const h_t* W = static_cast<const h_t*>(p.w);
  if (threadIdx.x == 0) tu.slot = slot;
  __syncthreads();
  build_union(p.idx, p.tokens, k, p.experts, m0, EBM, &s_bits, s_pos, &tu);
  for (int q = threadIdx.x; q < EBM * k; q += kThreads) {
    const int64_t t = m0 + q / k;
    float c = 0.f;
    if (t < p.tokens) {
      c = 1.f;
      if (p.weight) {
        const int64_t e = p.idx[t * k + q % k];
        c = p.weight[t * k + q % k] * ((e >= 0 && e < p.experts) ? p.scaling[e] : 0.f);
      }
    }
    coef[(q / k) * kMaxTopK + q % k] = c;
  }
  __syncthreads();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.f);
  const int ktot = tu.count * r;
  for (int k0 = 0; k0 < ktot; k0 += BK) {
    // H: 64 x BK, 8 consecutive K entries per thread.
    {
      const int row = threadIdx.x / 4, seg = (threadIdx.x % 4) * 8;
      const int64_t t = m0 + row;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int q = k0 + seg + i;
        float v = 0.f;
        if (q < ktot && t < p.tokens) {
          const int j = slot[row * kMaxExperts + q / r];
          if (j >= 0) v = coef[row * kMaxTopK + j] * p.P[(t * k + j) * r + q % r];
        }
        hs[row * LDK + seg + i] = from_f<h_t>(v);
      }
    }
    if constexpr (!kTransposed) {
      // ws[n * LDK + kk] = B[e][n0 + n][c], q = k0 + kk = u * r + c.
      for (int q = threadIdx.x; q < EBN * (BK / 8); q += kThreads) {
        const int n = q / (BK / 8), seg = (q % (BK / 8)) * 8;
        const int64_t ng = n0 + n;
        h_t* dst = ws + n * LDK + seg;
        if constexpr (kVec) {  // r % 8 == 0: the 8 entries belong to one expert
          const int kq = k0 + seg;
          const bool ok = kq < ktot && ng < p.d;
          const int e = ok ? tu.expert[kq / r] : 0;
          cp_async16(dst, ok ? W + (int64_t(e) * p.d + ng) * r + kq % r : W, ok);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int kq = k0 + seg + i;
            dst[i] = (kq < ktot && ng < p.d) ? W[(int64_t(tu.expert[kq / r]) * p.d + ng) * r + kq % r]
                                             : from_f<h_t>(0.f);
          }
        }
      }
    } else {
      // ws[kk * ELDN + n] = A[e][c][n0 + n].
      for (int q = threadIdx.x; q < BK * (EBN / 8); q += kThreads) {
        const int kk = q / (EBN / 8), n = (q % (EBN / 8)) * 8;
        const int kq = k0 + kk;
        const int64_t ng = n0 + n;
        h_t* dst = ws + kk * ELDN + n;
        const bool in = kq < ktot;
        const h_t* src = W + (int64_t(in ? tu.expert[kq / r] : 0) * r + (in ? kq % r : 0)) * p.d + ng;
        if constexpr (kVec) {  // d % 8 == 0
          const bool ok = in && ng < p.d;
          cp_async16(dst, ok ? src : W, ok);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) dst[i] = (in && ng + i < p.d) ? src[i] : from_f<h_t>(0.f);
        }
      }
    }
    if constexpr (kVec) {
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, h_t, wmma::row_major> a;
      wmma::load_matrix_sync(a, hs + wm * 16 * LDK + kk, LDK);
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        const int col = wn * 64 + f * 16;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, h_t, BLayout> b;
        if constexpr (kTransposed) {
          wmma::load_matrix_sync(b, ws + kk * ELDN + col, ELDN);
        } else {
          wmma::load_matrix_sync(b, ws + col * LDK + kk, LDK);
        }
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < 4; ++f)
    wmma::store_matrix_sync(cs + wm * 16 * ELDC + wn * 64 + f * 16, acc[f], ELDC, wmma::mem_row_major);
  __syncthreads();
  const h_t* base = static_cast<const h_t*>(p.base);
  h_t* out = static_cast<h_t*>(p.out);
  for (int q = threadIdx.x; q < EBM * EBN; q += kThreads) {
    const int row = q / EBN, n = q % EBN;
    const int64_t t = m0 + row, ng = n0 + n;
    if (t >= p.tokens || ng >= p.d) continue;
    float v = cs[row * ELDC + n];
    if (base) v += to_f(base[t * p.base_ld + ng]);
    out[t * p.d + ng] = from_f<h_t>(v);
  }
}

// ---------------------------------------------------------------------------------------------
// Stable counting sort of pairs by expert, one block of 1024 threads.
__global__ void __launch_bounds__(1024) sort_pairs_kernel(const int64_t* __restrict__ idx, int64_t pairs,
                                                          int experts, int* __restrict__ perm,
                                                          int* __restrict__ offsets) {
  __shared__ int count[kMaxExperts];
  __shared__ int cursor[kMaxExperts];
  __shared__ int warp_count[32][kMaxExperts];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x < kMaxExperts) count[threadIdx.x] = 0;
  __syncthreads();
  for (int64_t q = threadIdx.x; q < pairs; q += blockDim.x) {
    const int64_t e = idx[q];
    if (e >= 0 && e < experts) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int e = 0; e < experts; ++e) {
      cursor[e] = s;
      offsets[e] = s;
      s += count[e];
    }
    offsets[experts] = s;
  }
  __syncthreads();
  for (int64_t base = 0; base < pairs; base += blockDim.x) {
    for (int q = threadIdx.x; q < 32 * kMaxExperts; q += blockDim.x) (&warp_count[0][0])[q] = 0;
    __syncthreads();
    const int64_t q = base + threadIdx.x;
    int e = -1;
    if (q < pairs) {
      const int64_t v = idx[q];
      if (v >= 0 && v < experts) e = static_cast<int>(v);
    }
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (e >= 0 && rank == 0) warp_count[warp][e] = __popc(peers);
    __syncthreads();
    if (threadIdx.x < experts) {
      int run = cursor[threadIdx.x];
      for (int w = 0; w < 32; ++w) {
        const int c = warp_count[w][threadIdx.x];
        warp_count[w][threadIdx.x] = run;
        run += c;
      }
      cursor[threadIdx.x] = run;
    }
    __syncthreads();
    if (e >= 0) perm[warp_count[warp][e] + rank] = static_cast<int>(q);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Weight gradients over sorted pairs: block (e, 128 columns, 512-pair slice) accumulates
// acc (r x 128) = L^T R over its pairs, L (pairs x r) fp32, R (pairs x 128) gathered rows.
constexpr int PBN = 128, PK = 32, PSLICE = 512, PLDL = PK + 8, PLDR = PBN + 8, PLDC = PBN + 4;

struct OuterParams {
  const int *perm, *offsets;
  int experts, rank, top_k;
  const float *L, *weight, *scaling;
  const void* R;
  int64_t r_ld, d;
  float* acc;
};

template <typename h_t, bool kTransposed, bool kVec>
__global__ void __launch_bounds__(kThreads) pair_outer_kernel(OuterParams p) {
  constexpr int L_ELEMS = 64 * PLDL, R_ELEMS = PK * PLDR;
  constexpr int MAIN_BYTES = (L_ELEMS + R_ELEMS) * int(sizeof(h_t));
  constexpr int C_BYTES = 64 * PLDC * int(sizeof(float));
  __shared__ __align__(128) unsigned char buf[MAIN_BYTES > C_BYTES ? MAIN_BYTES : C_BYTES];
  h_t* ls = reinterpret_cast<h_t*>(buf);
  h_t* rs = ls + L_ELEMS;
  float* cs = reinterpret_cast<float*>(buf);
  const int e = blockIdx.x;
  const int64_t n0 = int64_t(blockIdx.y) * PBN;
  const int begin = p.offsets[e] + blockIdx.z * PSLICE;
  const int end = min(p.offsets[e + 1], begin + PSLICE);
  if (begin >= end) return;
  const int r = p.rank, k = p.top_k, rm = (r + 15) / 16;
  const int warp = threadIdx.x / 32;
  const h_t* R = static_cast<const h_t*>(p.R);
  const float scale = kTransposed ? p.scaling[e] : 1.f;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.f);
  for (int c0 = begin; c0 < end; c0 += PK) {
    // ls[c * PLDL + kk] = L[pair, c] (times w s for lora_b).
    for (int q = threadIdx.x; q < rm * 16 * PK; q += kThreads) {
      const int c = q / PK, kk = q % PK;
      float v = 0.f;
      if (c < r && c0 + kk < end) {
        const int pair = p.perm[c0 + kk];
        v = p.L[int64_t(pair) * r + c];
        if constexpr (kTransposed) v *= p.weight[pair] * scale;
      }
      ls[c * PLDL + kk] = from_f<h_t>(v);
    }
    // rs[kk * PLDR + n] = R[token(pair), n0 + n].
    for (int q = threadIdx.x; q < PK * (PBN / 8); q += kThreads) {
      const int kk = q / (PBN / 8), n = (q % (PBN / 8)) * 8;
      const int64_t ng = n0 + n;
      h_t* dst = rs + kk * PLDR + n;
      const bool in = c0 + kk < end;
      const int64_t t = in ? p.perm[c0 + kk] / k : 0;
      if constexpr (kVec) {
        const bool ok = in && ng < p.d;
        cp_async16(dst, ok ? R + t * p.r_ld + ng : R, ok);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) dst[i] = (in && ng + i < p.d) ? R[t * p.r_ld + ng + i] : from_f<h_t>(0.f);
      }
    }
    if constexpr (kVec) {
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < PK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, h_t, wmma::row_major> b;
      wmma::load_matrix_sync(b, rs + kk * PLDR + warp * 16, PLDR);
#pragma unroll
      for (int mf = 0; mf < 4; ++mf) {
        if (mf < rm) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, h_t, wmma::row_major> a;
          wmma::load_matrix_sync(a, ls + mf * 16 * PLDL + kk, PLDL);
          wmma::mma_sync(acc[mf], a, b, acc[mf]);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int mf = 0; mf < 4; ++mf)
    if (mf < rm) wmma::store_matrix_sync(cs + mf * 16 * PLDC + warp * 16, acc[mf], PLDC, wmma::mem_row_major);
  __syncthreads();
  for (int q = threadIdx.x; q < r * PBN; q += kThreads) {
    const int c = q / PBN, n = q % PBN;
    const int64_t ng = n0 + n;
    if (ng >= p.d) continue;
    const float v = cs[c * PLDC + n];
    if constexpr (kTransposed) {
      atomicAdd(&p.acc[(int64_t(e) * p.d + ng) * r + c], v);
    } else {
      atomicAdd(&p.acc[(int64_t(e) * r + c) * p.d + ng], v);
    }
  }
}

// Dense-shrink companion: hall (T, N r) fp32 = x A_all^T from one cuBLAS GEMM. Keeps each pair's
// hidden (T, k, r) and writes H (T, N r) = w s hall at the selected experts, 0 elsewhere, the left
// operand of the expand GEMM. One block per token.
template <typename h_t>
__global__ void __launch_bounds__(kThreads) select_kernel(const float* __restrict__ hall, const int64_t* __restrict__ idx,
                                                          const float* __restrict__ weight,
                                                          const float* __restrict__ scaling, int experts, int rank,
                                                          int top_k, float* __restrict__ hidden, h_t* __restrict__ H) {
  __shared__ int s_e[kMaxTopK];
  __shared__ float s_c[kMaxTopK];
  const int64_t t = blockIdx.x;
  if (threadIdx.x < top_k) {
    const int64_t e = idx[t * top_k + threadIdx.x];
    const bool ok = e >= 0 && e < experts;
    s_e[threadIdx.x] = ok ? int(e) : -1;
    s_c[threadIdx.x] = ok ? weight[t * top_k + threadIdx.x] * scaling[e] : 0.f;
  }
  __syncthreads();
  const float* row = hall + t * int64_t(experts) * rank;
  for (int q = threadIdx.x; q < experts * rank; q += kThreads) {
    const int e = q / rank;
    float v = 0.f;
    for (int j = 0; j < top_k; ++j)
      if (s_e[j] == e) v += s_c[j] * row[q];
    H[t * int64_t(experts) * rank + q] = from_f<h_t>(v);
  }
  for (int q = threadIdx.x; q < top_k * rank; q += kThreads) {
    const int j = q / rank, e = s_e[j];
    hidden[t * top_k * rank + q] = e >= 0 ? row[e * rank + q % rank] : 0.f;
  }
}

// Dense backward companion: bt (T, N r) fp32 = g B_all from one GEMM. Per pair: grad_h = w s bt
// (+ grad_hidden), grad_w = s <bt, hidden>; rows GH (T, N r) = grad_h and H (T, N r) = w s hidden at
// the selected experts (0 elsewhere), the operands of the grad-x and weight-gradient GEMMs.
template <typename h_t>
__global__ void __launch_bounds__(kThreads) select_backward_kernel(
    const float* __restrict__ bt, const int64_t* __restrict__ idx, const float* __restrict__ weight,
    const float* __restrict__ scaling, const float* __restrict__ hidden, const float* __restrict__ grad_hidden,
    int experts, int rank, int top_k, float* __restrict__ grad_h, float* __restrict__ grad_w, h_t* __restrict__ GH,
    h_t* __restrict__ H) {
  __shared__ int s_e[kMaxTopK];
  __shared__ float s_w[kMaxTopK], s_s[kMaxTopK];
  __shared__ float s_gh[kMaxTopK * kMaxRank];
  const int64_t t = blockIdx.x;
  const int nr = experts * rank;
  if (threadIdx.x < top_k) {
    const int64_t e = idx[t * top_k + threadIdx.x];
    const bool ok = e >= 0 && e < experts;
    s_e[threadIdx.x] = ok ? int(e) : -1;
    s_w[threadIdx.x] = weight[t * top_k + threadIdx.x];
    s_s[threadIdx.x] = ok ? scaling[e] : 0.f;
  }
  __syncthreads();
  const float* row = bt + t * int64_t(nr);
  const int64_t pr = t * top_k * rank;
  for (int q = threadIdx.x; q < top_k * rank; q += kThreads) {
    const int j = q / rank, e = s_e[j];
    const float v = e >= 0 ? row[e * rank + q % rank] : 0.f;
    const float g = v * s_w[j] * s_s[j] + (grad_hidden ? grad_hidden[pr + q] : 0.f);
    s_gh[q] = g;
    grad_h[pr + q] = g;
  }
  if (grad_w && threadIdx.x < top_k) {
    const int j = threadIdx.x, e = s_e[j];
    float dot = 0.f;
    if (e >= 0)
      for (int c = 0; c < rank; ++c) dot += row[e * rank + c] * hidden[pr + j * rank + c];
    grad_w[t * top_k + j] = s_s[j] * dot;
  }
  __syncthreads();
  for (int q = threadIdx.x; q < nr; q += kThreads) {
    const int e = q / rank, c = q % rank;
    float gv = 0.f, hv = 0.f;
    for (int j = 0; j < top_k; ++j) {
      if (s_e[j] != e) continue;
      gv += s_gh[j * rank + c];
      hv += s_w[j] * s_s[j] * hidden[pr + j * rank + c];
    }
    GH[t * int64_t(nr) + q] = from_f<h_t>(gv);
    H[t * int64_t(nr) + q] = from_f<h_t>(hv);
  }
}

// Decode-sized expand: one thread per (token, output column) over the token's k experts.
template <typename h_t>
__global__ void __launch_bounds__(kThreads) expand_small_kernel(const float* __restrict__ P, const int64_t* __restrict__ idx,
                                                                int top_k, const float* __restrict__ weight,
                                                                const float* __restrict__ scaling,
                                                                const h_t* __restrict__ B, int experts, int rank,
                                                                int64_t d, const h_t* __restrict__ base,
                                                                int64_t base_ld, h_t* __restrict__ out) {
  __shared__ float s_p[kMaxTopK * kMaxRank];
  __shared__ int s_e[kMaxTopK];
  const int64_t t = blockIdx.y;
  for (int q = threadIdx.x; q < top_k * rank; q += kThreads) {
    const int j = q / rank;
    const int64_t e = idx[t * top_k + j];
    const bool ok = e >= 0 && e < experts;
    s_p[q] = ok ? P[t * top_k * rank + q] * weight[t * top_k + j] * scaling[e] : 0.f;
    if (q % rank == 0) s_e[j] = ok ? int(e) : -1;
  }
  __syncthreads();
  const int64_t n = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= d) return;
  float acc = base ? to_f(base[t * base_ld + n]) : 0.f;
  for (int j = 0; j < top_k; ++j) {
    if (s_e[j] < 0) continue;
    const h_t* b = B + (int64_t(s_e[j]) * d + n) * rank;
    for (int c = 0; c < rank; ++c) acc += s_p[j * rank + c] * to_f(b[c]);
  }
  out[t * d + n] = from_f<h_t>(acc);
}

__global__ void topk_kernel(const float* __restrict__ logits, const bool* __restrict__ mask, int64_t tokens,
                            int experts, int top_k, float temperature, float* __restrict__ weight,
                            int64_t* __restrict__ idx) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  topk_softmax<float>(logits + t * experts, 1, mask, experts, top_k, temperature, weight + t * top_k,
                      idx + t * top_k);
}

unsigned blocks_for(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }

// ---------------------------------------------------------------------------------------------
// Inference path of meteora.linear. hall (T, ld) fp32 rows are [N gate logits | N r shrink values]
// from one GEMM of x with the packed [gate; A] rows.

// One warp selects a token's top k: the same choice and weights as topk_softmax (csrc/topk.h):
// descending logits, ties and masked (-inf) experts toward the lower index, softmax over the k
// selected / temperature, all weights 0 when every expert is masked. Lane l holds experts l and
// l + 32. Results for every lane: e[j], w[j] for j < top_k.
__device__ __forceinline__ void warp_topk_softmax(const float* __restrict__ row, const bool* __restrict__ mask,
                                                  int experts, int top_k, float temperature, int* e_out,
                                                  float* w_out) {
  const int lane = threadIdx.x % 32;
  float v[2];
  bool live[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int e = lane + 32 * h;
    live[h] = e < experts;
    v[h] = live[h] ? ((mask == nullptr || mask[e]) ? row[e] : -INFINITY) : -INFINITY;
  }
  float selected[kMaxTopK];
  for (int j = 0; j < top_k; ++j) {
    // This lane's best candidate: the larger live value, the lower index on ties.
    int best = -1;
    float best_v = -INFINITY;
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (live[h] && (best < 0 || v[h] > best_v)) {
        best = lane + 32 * h;
        best_v = v[h];
      }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const int ob = __shfl_xor_sync(0xffffffffu, best, off);
      const float ov = __shfl_xor_sync(0xffffffffu, best_v, off);
      const bool better = ob >= 0 && (best < 0 || ov > best_v || (ov == best_v && ob < best));
      if (better) {
        best = ob;
        best_v = ov;
      }
    }
    e_out[j] = best;
    selected[j] = best_v;
    if (best == lane) live[0] = false;
    if (best == lane + 32) live[1] = false;
  }
  const float top = selected[0];
  float denom = 0.f;
  for (int j = 0; j < top_k; ++j) {
    selected[j] = top == -INFINITY ? 0.f : exp_of((selected[j] - top) / temperature);
    denom += selected[j];
  }
  for (int j = 0; j < top_k; ++j) w_out[j] = denom > 0 ? selected[j] / denom : 0.f;
}

// The piece of a several-piece launch that this block works on: piece p covers blocks
// [first_block[p], first_block[p + 1]) along x.
__device__ __forceinline__ int piece_of(const unsigned* first_block, int n) {
  int p = 0;
  while (p + 1 < n && blockIdx.x >= first_block[p + 1]) ++p;
  return p;
}

// Up to kMaxRoutePieces linears of one route_expand launch: piece p covers blocks
// [first_block[p], first_block[p + 1]) along x.
struct RoutePieces {
  RoutePiece piece[kMaxRoutePieces];
  unsigned first_block[kMaxRoutePieces + 1];
  bool vec[kMaxRoutePieces];
  int n;
};

// Decode-sized T: grid (sum over the pieces of d_out / kThreads, T). Warp 0 routes the token from
// its hall row in shared memory (each piece's first block also writes logits, weight and idx); then
// every thread writes its output column's sum over the selected experts (or, with `out`, the
// column's output: base + bias + that sum):
// delta[t, n] = sum_j w_j s_j <B[e_j, n, :], hall[t, N + e_j r : + r]> (B[e, n, c] at
// e b_es + n b_ns + c: the experts' (N, d, r) tensor, or their columns in a row-major buffer).
template <typename h_t>
__global__ void __launch_bounds__(kThreads) route_expand_kernel(const RoutePieces pieces) {
  extern __shared__ float s_row[];  // experts * (1 + rank) values of hall
  __shared__ float s_coef[kMaxTopK], s_scale[kMaxExperts];
  __shared__ int s_e[kMaxTopK];
  const int p = piece_of(pieces.first_block, pieces.n);
  const RoutePiece& q = pieces.piece[p];
  const int experts = q.experts, rank = q.rank, top_k = q.top_k;
  const unsigned block = blockIdx.x - pieces.first_block[p];
  const int64_t t = blockIdx.y;
  const int64_t n = int64_t(block) * kThreads + threadIdx.x;
  const float* row = q.hall + t * q.ld;
  const int width = experts * (1 + rank);
  for (int c = threadIdx.x; c < width; c += kThreads) s_row[c] = row[c];
  if (threadIdx.x < experts) s_scale[threadIdx.x] = q.scaling[threadIdx.x];
  __syncthreads();
  if (threadIdx.x < 32) {
    int e[kMaxTopK];
    float w[kMaxTopK];
    warp_topk_softmax(s_row, q.mask, experts, top_k, q.temperature, e, w);
    if (threadIdx.x == 0)
      for (int j = 0; j < top_k; ++j) {
        s_e[j] = e[j];
        s_coef[j] = w[j] * s_scale[e[j]];
        if (block == 0) {
          q.weight[t * top_k + j] = w[j];
          q.idx[t * top_k + j] = e[j];
        }
      }
  }
  if (block == 0)
    for (int c = threadIdx.x; c < experts; c += kThreads) q.logits[t * experts + c] = s_row[c];
  __syncthreads();
  if (n >= q.d_out) return;
  const h_t* B = static_cast<const h_t*>(q.lora_b);
  float acc = 0.f;
  for (int j = 0; j < top_k; ++j) {
    const h_t* b = B + int64_t(s_e[j]) * q.b_es + n * q.b_ns;
    const float* h = s_row + experts + s_e[j] * rank;
    float dot = 0.f;
    if (pieces.vec[p]) {
      for (int c0 = 0; c0 < rank; c0 += 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(b + c0);
        const h_t* v = reinterpret_cast<const h_t*>(&raw);
#pragma unroll
        for (int c = 0; c < 8; ++c) dot += h[c0 + c] * to_f(v[c]);
      }
    } else {
      for (int c = 0; c < rank; ++c) dot += h[c] * to_f(b[c]);
    }
    acc += s_coef[j] * dot;
  }
  if (q.out != nullptr) {
    if (q.bias != nullptr) acc += to_f(static_cast<const h_t*>(q.bias)[n]);
    static_cast<h_t*>(q.out)[t * q.d_out + n] = from_f<h_t>(q.base[t * q.ld + n] + acc);
  } else {
    q.delta[t * q.d_out + n] = acc;
  }
}

// Up to kMaxDeltaPieces (out, delta) pairs of one launch: piece p covers blocks
// [first_block[p], first_block[p + 1]).
struct DeltaPieces {
  void* out[kMaxDeltaPieces];
  const float* delta[kMaxDeltaPieces];
  int64_t count[kMaxDeltaPieces];
  unsigned first_block[kMaxDeltaPieces + 1];
  bool vec[kMaxDeltaPieces];
  int n;
};

// out (T, d) in place += delta (T, d) fp32, one rounding, for every piece; 8 elements per thread
// when aligned.
template <typename h_t>
__global__ void __launch_bounds__(kThreads) add_delta_kernel(const DeltaPieces pieces) {
  const int p = piece_of(pieces.first_block, pieces.n);
  h_t* __restrict__ out = static_cast<h_t*>(pieces.out[p]);
  const float* __restrict__ delta = pieces.delta[p];
  const int64_t count = pieces.count[p];
  const int64_t i = (int64_t(blockIdx.x - pieces.first_block[p]) * kThreads + threadIdx.x) * 8;
  if (pieces.vec[p] && i + 8 <= count) {
    uint4 raw = *reinterpret_cast<const uint4*>(out + i);
    h_t* v = reinterpret_cast<h_t*>(&raw);
    const float4 d0 = *reinterpret_cast<const float4*>(delta + i), d1 = *reinterpret_cast<const float4*>(delta + i + 4);
    const float dv[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
#pragma unroll
    for (int c = 0; c < 8; ++c) v[c] = from_f<h_t>(to_f(v[c]) + dv[c]);
    *reinterpret_cast<uint4*>(out + i) = raw;
    return;
  }
  for (int64_t q = i; q < i + 8 && q < count; ++q) out[q] = from_f<h_t>(to_f(out[q]) + delta[q]);
}

// dst[t, :cols] = src[t, :cols] for 2-byte elements, rows ldd / lds elements apart: 16 bytes per
// thread when both sides allow it (a cudaMemcpy2D of the same rows ran at a quarter of copy bandwidth).
template <bool kVec>
__global__ void __launch_bounds__(kThreads) copy_rows_kernel(uint16_t* __restrict__ dst, int64_t ldd,
                                                            const uint16_t* __restrict__ src, int64_t lds,
                                                            int64_t rows, int64_t cols) {
  constexpr int kPer = kVec ? 8 : 1;
  const int64_t per_row = (cols + kPer - 1) / kPer;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= rows * per_row) return;
  const int64_t t = i / per_row, c = (i % per_row) * kPer;
  if constexpr (kVec) {
    *reinterpret_cast<uint4*>(dst + t * ldd + c) = *reinterpret_cast<const uint4*>(src + t * lds + c);
  } else {
    dst[t * ldd + c] = src[t * lds + c];
  }
}

// Prefill-sized T: a block of kSelectTokens tokens of one piece (blockIdx.y); one warp per token
// routes it (logits, weight, idx, and each selected expert's coefficient w s in shared memory), then
// the whole block writes the tokens' rows H[t] (N r, x's dtype; rows ldh apart) = w s hall at the
// selected experts, 0 elsewhere, reading hall only where the coefficient is not 0: the left operand
// of the expand GEMM (out += H B_all^T, or the columns after x in [x | H] [W0 | B_all]^T). With
// rank % 8 == 0 each thread writes 16 bytes, 8 values of one expert.
constexpr int kSelectTokens = kThreads / 32;
struct SelectPieces {
  RoutePiece piece[kMaxRoutePieces];
  bool vec[kMaxRoutePieces];
};

template <typename h_t>
__global__ void __launch_bounds__(kThreads) route_select_kernel(const SelectPieces pieces, int64_t tokens) {
  __shared__ float s_coef[kSelectTokens][kMaxExperts];
  const RoutePiece& q = pieces.piece[blockIdx.y];
  const int experts = q.experts, rank = q.rank, top_k = q.top_k, nr = experts * rank;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t0 = int64_t(blockIdx.x) * kSelectTokens;
  const int rows = int(tokens - t0 < kSelectTokens ? tokens - t0 : kSelectTokens);
  for (int c = threadIdx.x; c < kSelectTokens * kMaxExperts; c += kThreads) (&s_coef[0][0])[c] = 0.f;
  __syncthreads();
  if (warp < rows) {
    const int64_t t = t0 + warp;
    const float* row = q.hall + t * q.ld;
    int e[kMaxTopK];
    float w[kMaxTopK];
    warp_topk_softmax(row, q.mask, experts, top_k, q.temperature, e, w);
    if (lane == 0)
      for (int j = 0; j < top_k; ++j) {
        q.weight[t * top_k + j] = w[j];
        q.idx[t * top_k + j] = e[j];
        s_coef[warp][e[j]] += w[j] * q.scaling[e[j]];
      }
    for (int c = lane; c < experts; c += 32) q.logits[t * experts + c] = row[c];
  }
  __syncthreads();
  h_t* H = static_cast<h_t*>(q.H);
  if (pieces.vec[blockIdx.y]) {
    const int chunks = nr / 8;
    for (int c = threadIdx.x; c < rows * chunks; c += kThreads) {
      const int u = c / chunks, col = (c % chunks) * 8;
      const int64_t t = t0 + u;
      const float coef = s_coef[u][col / rank];
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (coef != 0.f) {
        const float* src = q.hall + t * q.ld + experts + col;
        h_t* v = reinterpret_cast<h_t*>(&raw);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = from_f<h_t>(coef * src[k]);
      }
      *reinterpret_cast<uint4*>(H + t * q.ldh + col) = raw;
    }
  } else {
    for (int c = threadIdx.x; c < rows * nr; c += kThreads) {
      const int u = c / nr, col = c % nr;
      const int64_t t = t0 + u;
      const float coef = s_coef[u][col / rank];
      H[t * q.ldh + col] = from_f<h_t>(coef != 0.f ? coef * q.hall[t * q.ld + experts + col] : 0.f);
    }
  }
}


template <typename Fn>
void dispatch_half(Half16 dt, Fn&& fn) {
  if (dt == Half16::kFloat16) {
    fn(__half{});
  } else {
    fn(__nv_bfloat16{});
  }
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

template <typename h_t, int BM, bool kBackward, bool kVec>
void launch_shrink_tile(const ShrinkParams& p, cudaStream_t stream) {
  using Cfg = ShrinkTile<h_t, BM, kBackward, kVec>;
  auto kernel = shrink_tile_kernel<h_t, BM, kBackward, kVec>;
  set_smem(kernel, Cfg::kSmem);
  kernel<<<blocks_for(p.tokens, BM), kThreads, Cfg::kSmem, stream>>>(p);
}

template <typename h_t, bool kBackward>
void shrink_tile(const ShrinkParams& p, bool vec, cudaStream_t stream) {
  // 64-token tiles read the experts' weights half as often; 32-token tiles fill the GPU sooner.
  const bool wide = p.tokens >= 64 * 132;
  if (vec) {
    wide ? launch_shrink_tile<h_t, 64, kBackward, true>(p, stream) : launch_shrink_tile<h_t, 32, kBackward, true>(p, stream);
  } else {
    wide ? launch_shrink_tile<h_t, 64, kBackward, false>(p, stream) : launch_shrink_tile<h_t, 32, kBackward, false>(p, stream);
  }
}

}  // namespace

void topk(const float* logits, const bool* mask, int64_t tokens, int experts, int top_k, float temperature,
          float* weight, int64_t* idx, cudaStream_t stream) {
  if (tokens == 0) return;
  topk_kernel<<<blocks_for(tokens, 128), 128, 0, stream>>>(logits, mask, tokens, experts, top_k, temperature,
                                                           weight, idx);
}

void shrink(Half16 dt, const void* x, int64_t x_ld, int64_t tokens, int64_t d_in, const void* lora_a, int experts,
            int rank, const int64_t* idx, int top_k, float* hidden, cudaStream_t stream) {
  if (tokens == 0) return;
  const bool vec = d_in % 8 == 0 && x_ld % 8 == 0 && aligned16(x) && aligned16(lora_a);
  dispatch_half(dt, [&](auto tag) {
    using h_t = decltype(tag);
    if (tokens * top_k <= 64) {
      const auto* xp = static_cast<const h_t*>(x);
      const auto* ap = static_cast<const h_t*>(lora_a);
      if (vec) {
        shrink_small_kernel<h_t, true><<<unsigned(tokens * top_k), kThreads, 0, stream>>>(
            xp, x_ld, ap, idx, top_k, experts, d_in, rank, hidden);
      } else {
        shrink_small_kernel<h_t, false><<<unsigned(tokens * top_k), kThreads, 0, stream>>>(
            xp, x_ld, ap, idx, top_k, experts, d_in, rank, hidden);
      }
      return;
    }
    ShrinkParams p{};
    p.x = x;
    p.x_ld = x_ld;
    p.tokens = tokens;
    p.K = d_in;
    p.w = lora_a;
    p.experts = experts;
    p.rank = rank;
    p.top_k = top_k;
    p.idx = idx;
    p.hidden = hidden;
    shrink_tile<h_t, false>(p, vec, stream);
  });
}

void shrink_backward(Half16 dt, const void* grad_out, int64_t tokens, int64_t d_out, const void* lora_b,
                     int experts, int rank, const int64_t* idx, int top_k, const float* weight,
                     const float* scaling, const float* hidden, const float* grad_hidden, float* grad_h,
                     float* grad_w, cudaStream_t stream) {
  if (tokens == 0) return;
  const bool vec = d_out % 8 == 0 && rank % 8 == 0 && aligned16(grad_out) && aligned16(lora_b);
  ShrinkParams p{};
  p.x = grad_out;
  p.x_ld = d_out;
  p.tokens = tokens;
  p.K = d_out;
  p.w = lora_b;
  p.experts = experts;
  p.rank = rank;
  p.top_k = top_k;
  p.idx = idx;
  p.weight = weight;
  p.scaling = scaling;
  p.hidden_in = hidden;
  p.grad_hidden = grad_hidden;
  p.grad_h = grad_h;
  p.grad_w = grad_w;
  dispatch_half(dt, [&](auto tag) { shrink_tile<decltype(tag), true>(p, vec, stream); });
}

void expand(Half16 dt, const float* P, const int64_t* idx, int top_k, int64_t tokens, const float* weight,
            const float* scaling, const void* w, bool transposed, int experts, int rank, int64_t d,
            const void* base, int64_t base_ld, void* out, cudaStream_t stream) {
  if (tokens == 0 || d == 0) return;
  if (!transposed && weight && tokens <= 16) {
    dispatch_half(dt, [&](auto tag) {
      using h_t = decltype(tag);
      expand_small_kernel<h_t><<<dim3(blocks_for(d, kThreads), unsigned(tokens)), kThreads, 0, stream>>>(
          P, idx, top_k, weight, scaling, static_cast<const h_t*>(w), experts, rank, d,
          static_cast<const h_t*>(base), base_ld, static_cast<h_t*>(out));
    });
    return;
  }
  ExpandParams p{P, idx, top_k, tokens, weight, scaling, w, experts, rank, d, base, base_ld, out};
  const bool vec = aligned16(w) && (transposed ? d % 8 == 0 : rank % 8 == 0);
  const dim3 grid(blocks_for(tokens, EBM), blocks_for(d, EBN));
  dispatch_half(dt, [&](auto tag) {
    using h_t = decltype(tag);
    if (transposed) {
      vec ? expand_tile_kernel<h_t, true, true><<<grid, kThreads, 0, stream>>>(p)
          : expand_tile_kernel<h_t, true, false><<<grid, kThreads, 0, stream>>>(p);
    } else {
      vec ? expand_tile_kernel<h_t, false, true><<<grid, kThreads, 0, stream>>>(p)
          : expand_tile_kernel<h_t, false, false><<<grid, kThreads, 0, stream>>>(p);
    }
  });
}

void select_dense(Half16 dt, const float* hall, const int64_t* idx, const float* weight, const float* scaling,
                  int64_t tokens, int experts, int rank, int top_k, float* hidden, void* H, cudaStream_t stream) {
  if (tokens == 0) return;
  dispatch_half(dt, [&](auto tag) {
    using h_t = decltype(tag);
    select_kernel<h_t><<<unsigned(tokens), kThreads, 0, stream>>>(hall, idx, weight, scaling, experts, rank, top_k,
                                                                  hidden, static_cast<h_t*>(H));
  });
}

void select_dense_backward(Half16 dt, const float* bt, const int64_t* idx, const float* weight,
                           const float* scaling, const float* hidden, const float* grad_hidden, int64_t tokens,
                           int experts, int rank, int top_k, float* grad_h, float* grad_w, void* GH, void* H,
                           cudaStream_t stream) {
  if (tokens == 0) return;
  dispatch_half(dt, [&](auto tag) {
    using h_t = decltype(tag);
    select_backward_kernel<h_t><<<unsigned(tokens), kThreads, 0, stream>>>(
        bt, idx, weight, scaling, hidden, grad_hidden, experts, rank, top_k, grad_h, grad_w, static_cast<h_t*>(GH),
        static_cast<h_t*>(H));
  });
}

void sort_pairs(const int64_t* idx, int64_t pairs, int experts, int* perm, int* offsets, cudaStream_t stream) {
  sort_pairs_kernel<<<1, 1024, 0, stream>>>(idx, pairs, experts, perm, offsets);
}

void pair_outer(Half16 dt, const int* perm, const int* offsets, int64_t pairs, int experts, int rank, int top_k,
                const float* L, const float* weight, const float* scaling, const void* R, int64_t r_ld, int64_t d,
                bool transposed, float* acc, cudaStream_t stream) {
  if (pairs == 0 || d == 0) return;
  OuterParams p{perm, offsets, experts, rank, top_k, L, weight, scaling, R, r_ld, d, acc};
  const dim3 grid(unsigned(experts), blocks_for(d, PBN), blocks_for(pairs, PSLICE));
  const bool vec = d % 8 == 0 && r_ld % 8 == 0 && aligned16(R);
  dispatch_half(dt, [&](auto tag) {
    using h_t = decltype(tag);
    if (transposed) {
      vec ? pair_outer_kernel<h_t, true, true><<<grid, kThreads, 0, stream>>>(p)
          : pair_outer_kernel<h_t, true, false><<<grid, kThreads, 0, stream>>>(p);
    } else {
      vec ? pair_outer_kernel<h_t, false, true><<<grid, kThreads, 0, stream>>>(p)
          : pair_outer_kernel<h_t, false, false><<<grid, kThreads, 0, stream>>>(p);
    }
  });
}

void route_expand(Half16 dt, const RoutePiece* pieces, int n, int64_t tokens, cudaStream_t stream) {
  if (tokens == 0) return;
  for (int j = 0; j < n;) {
    RoutePieces launch{};
    unsigned blocks = 0;
    size_t smem = 0;
    for (; j < n && launch.n < kMaxRoutePieces; ++j) {
      const RoutePiece& q = pieces[j];
      const int p = launch.n++;
      launch.piece[p] = q;
      launch.first_block[p] = blocks;
      blocks += blocks_for(q.d_out > 0 ? q.d_out : 1, kThreads);  // d_out 0: the routing outputs only
      launch.vec[p] = q.rank % 8 == 0 && aligned16(q.lora_b) && (q.experts == 1 || q.b_es % 8 == 0) && q.b_ns % 8 == 0;
      smem = std::max(smem, size_t(q.experts) * (1 + q.rank) * sizeof(float));  // <= 64 x 65 floats
    }
    launch.first_block[launch.n] = blocks;
    dispatch_half(dt, [&](auto tag) {
      using h_t = decltype(tag);
      route_expand_kernel<h_t><<<dim3(blocks, unsigned(tokens)), kThreads, smem, stream>>>(launch);
    });
  }
}

void add_delta(Half16 dt, const DeltaPiece* pieces, int n, cudaStream_t stream) {
  for (int j = 0; j < n;) {
    DeltaPieces launch{};
    unsigned blocks = 0;
    for (; j < n && launch.n < kMaxDeltaPieces; ++j) {
      if (pieces[j].count == 0) continue;
      const int p = launch.n++;
      launch.out[p] = pieces[j].out;
      launch.delta[p] = pieces[j].delta;
      launch.count[p] = pieces[j].count;
      launch.vec[p] = aligned16(pieces[j].out) && aligned16(pieces[j].delta);
      launch.first_block[p] = blocks;
      blocks += blocks_for(pieces[j].count, int64_t(kThreads) * 8);
    }
    if (launch.n == 0) continue;
    launch.first_block[launch.n] = blocks;
    dispatch_half(dt, [&](auto tag) {
      using h_t = decltype(tag);
      add_delta_kernel<h_t><<<blocks, kThreads, 0, stream>>>(launch);
    });
  }
}

void copy_rows(void* dst, int64_t ldd, const void* src, int64_t lds, int64_t rows, int64_t cols,
               cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const bool vec = cols % 8 == 0 && ldd % 8 == 0 && lds % 8 == 0 && aligned16(dst) && aligned16(src);
  const int64_t count = rows * (vec ? cols / 8 : cols);
  auto* d = static_cast<uint16_t*>(dst);
  const auto* s = static_cast<const uint16_t*>(src);
  vec ? copy_rows_kernel<true><<<blocks_for(count, kThreads), kThreads, 0, stream>>>(d, ldd, s, lds, rows, cols)
      : copy_rows_kernel<false><<<blocks_for(count, kThreads), kThreads, 0, stream>>>(d, ldd, s, lds, rows, cols);
}

void route_select(Half16 dt, const RoutePiece* pieces, int n, int64_t tokens, cudaStream_t stream) {
  if (tokens == 0) return;
  for (int j = 0; j < n; j += kMaxRoutePieces) {
    SelectPieces launch{};
    const int count = n - j < kMaxRoutePieces ? n - j : kMaxRoutePieces;
    for (int p = 0; p < count; ++p) {
      const RoutePiece& q = pieces[j + p];
      launch.piece[p] = q;
      launch.vec[p] = q.rank % 8 == 0 && q.ldh % 8 == 0 && aligned16(q.H);
    }
    dispatch_half(dt, [&](auto tag) {
      using h_t = decltype(tag);
      route_select_kernel<h_t><<<dim3(blocks_for(tokens, kSelectTokens), unsigned(count)), kThreads, 0, stream>>>(
          launch, tokens);
    });
  }
}

}  // namespace meteora::cuda
