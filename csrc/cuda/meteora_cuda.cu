// CUDA side of the meteora ops. Routing: gate logits by one cuBLAS GEMM with fp32 output, then
// the shared top-k (csrc/topk.h) in a kernel. LoRA experts: fp16 / bf16 go through the grouped
// tensor-core kernels of grouped.cu; fp32 (a correctness path, not a speed target) through the SIMT
// kernels below. Everything runs on the current stream with no host sync, so CUDA graphs capture it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "aten_impl.h"
#include "checks.h"
#include "cuda/fused_expand.h"
#include "cuda/grouped.h"

namespace meteora {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kChunk = 8;  // dot products one warp accumulates at once

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// One warp per (token, slot) pair p = t * k + j: hidden[p, :] = A[e] x_t, e = idx[p].
template <typename x_t>
__global__ void shrink_kernel(const x_t* __restrict__ x, int64_t x_s0, int64_t x_s1,
                              const x_t* __restrict__ lora_a, const int64_t* __restrict__ idx,
                              int64_t pairs, int top_k, int64_t d_in, int rank,
                              float* __restrict__ hidden) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t p = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (p >= pairs) return;
  const x_t* row = x + (p / top_k) * x_s0;
  const x_t* a = lora_a + idx[p] * rank * d_in;
  for (int r0 = 0; r0 < rank; r0 += kChunk) {
    float acc[kChunk] = {};
    for (int64_t i = lane; i < d_in; i += kWarp) {
      const float xv = to_float(row[i * x_s1]);
#pragma unroll
      for (int c = 0; c < kChunk; ++c)
        if (r0 + c < rank) acc[c] += xv * to_float(a[int64_t(r0 + c) * d_in + i]);
    }
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      const float s = warp_sum(acc[c]);
      if (lane == 0 && r0 + c < rank) hidden[p * rank + r0 + c] = s;
    }
  }
}

// One block per token: out[t, o] = base[t, o] + sum_j w_j s_{e_j} <B[e_j, o, :], hidden[t, j, :]>.
template <typename x_t>
__global__ void expand_kernel(const float* __restrict__ hidden, const x_t* __restrict__ lora_b,
                              const float* __restrict__ scaling, const int64_t* __restrict__ idx,
                              const float* __restrict__ weight, const x_t* __restrict__ base,
                              int top_k, int rank, int64_t d_out, x_t* __restrict__ out) {
  __shared__ float s_hidden[kMaxTopK * kMaxRank];
  __shared__ float s_coef[kMaxTopK];
  __shared__ int64_t s_expert[kMaxTopK];
  const int64_t t = blockIdx.x;
  for (int q = threadIdx.x; q < top_k * rank; q += blockDim.x) s_hidden[q] = hidden[t * top_k * rank + q];
  if (threadIdx.x < top_k) {
    const int64_t e = idx[t * top_k + threadIdx.x];
    s_expert[threadIdx.x] = e;
    s_coef[threadIdx.x] = weight[t * top_k + threadIdx.x] * scaling[e];
  }
  __syncthreads();
  for (int64_t o = threadIdx.x; o < d_out; o += blockDim.x) {
    float acc = base ? to_float(base[t * d_out + o]) : 0.f;
    for (int j = 0; j < top_k; ++j) {
      const x_t* b = lora_b + (s_expert[j] * d_out + o) * rank;
      float dot = 0.f;
      for (int r = 0; r < rank; ++r) dot += to_float(b[r]) * s_hidden[j * rank + r];
      acc += s_coef[j] * dot;
    }
    out[t * d_out + o] = static_cast<x_t>(acc);
  }
}

// One warp per pair p: bt = B[e]^T g_t (r values), then
// grad_weight[p] = s_e <bt, hidden[p]> and grad_hidden_total[p] = w_p s_e bt (+ grad_hidden[p]).
template <typename x_t>
__global__ void backward_pair_kernel(const x_t* __restrict__ grad_out, const x_t* __restrict__ lora_b,
                                     const float* __restrict__ scaling, const int64_t* __restrict__ idx,
                                     const float* __restrict__ weight, const float* __restrict__ hidden,
                                     const float* __restrict__ grad_hidden, int64_t pairs, int top_k,
                                     int rank, int64_t d_out, float* __restrict__ grad_weight,
                                     float* __restrict__ grad_h) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t p = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (p >= pairs) return;
  const int64_t e = idx[p];
  const x_t* g = grad_out + (p / top_k) * d_out;
  const x_t* b = lora_b + e * d_out * rank;
  const float s = scaling[e], coef = weight[p] * s;
  float dot = 0.f;
  for (int r0 = 0; r0 < rank; r0 += kChunk) {
    float acc[kChunk] = {};
    for (int64_t o = lane; o < d_out; o += kWarp) {
      const float gv = to_float(g[o]);
#pragma unroll
      for (int c = 0; c < kChunk; ++c)
        if (r0 + c < rank) acc[c] += gv * to_float(b[o * rank + r0 + c]);
    }
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      const float bt = warp_sum(acc[c]);
      if (lane == 0 && r0 + c < rank) {
        const int64_t q = p * rank + r0 + c;
        dot += bt * hidden[q];
        grad_h[q] = bt * coef + (grad_hidden ? grad_hidden[q] : 0.f);
      }
    }
  }
  if (lane == 0 && grad_weight) grad_weight[p] = dot * s;
}

// One block per token: grad_x[t, i] = sum_j <A[e_j, :, i], grad_h[t, j, :]>.
template <typename x_t>
__global__ void grad_x_kernel(const float* __restrict__ grad_h, const x_t* __restrict__ lora_a,
                              const int64_t* __restrict__ idx, int top_k, int rank, int64_t d_in,
                              x_t* __restrict__ grad_x) {
  __shared__ float s_gh[kMaxTopK * kMaxRank];
  __shared__ int64_t s_expert[kMaxTopK];
  const int64_t t = blockIdx.x;
  for (int q = threadIdx.x; q < top_k * rank; q += blockDim.x) s_gh[q] = grad_h[t * top_k * rank + q];
  if (threadIdx.x < top_k) s_expert[threadIdx.x] = idx[t * top_k + threadIdx.x];
  __syncthreads();
  for (int64_t i = threadIdx.x; i < d_in; i += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const x_t* a = lora_a + s_expert[j] * rank * d_in + i;
      for (int r = 0; r < rank; ++r) acc += to_float(a[int64_t(r) * d_in]) * s_gh[j * rank + r];
    }
    grad_x[t * d_in + i] = static_cast<x_t>(acc);
  }
}

void check_cuda_dtype(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "meteora.", op, ": CUDA kernels take float32, float16 or bfloat16 x, got ", x.scalar_type());
}

unsigned int warp_blocks(int64_t items) {
  return static_cast<unsigned int>((items + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// Largest N r (expert rank rows) for which the forward runs as dense GEMMs at prefill sizes.
constexpr int64_t kDenseMaxRows = 512;

bool is_half16(const at::Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
}

cuda::Half16 half16(const at::Tensor& x) {
  return x.scalar_type() == at::kHalf ? cuda::Half16::kFloat16 : cuda::Half16::kBFloat16;
}

// Unit column stride (the tensor-core kernels read rows); any row stride.
at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.stride(1) == 1 || t.size(1) <= 1) ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& x, const at::Tensor& gate_weight,
    const std::optional<at::Tensor>& expert_mask, int64_t top_k, double temperature) {
  check_route_inputs(x, gate_weight, expert_mask, top_k, temperature);
  check_cuda_dtype(x, "route");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = x.size(0), experts = gate_weight.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor weight = at::empty({tokens, top_k}, f32);
  at::Tensor idx = at::empty({tokens, top_k}, x.options().dtype(at::kLong));
  // fp16 / bf16 products are exact in fp32, so fp32-output GEMM = the reference's fp32 math.
  at::Tensor logits = mm_fp32(x, gate_weight.t());
  if (tokens == 0) return {logits, weight, idx};
  at::Tensor mask;
  if (expert_mask.has_value()) mask = expert_mask->contiguous();
  cuda::topk(logits.data_ptr<float>(), mask.defined() ? mask.data_ptr<bool>() : nullptr, tokens,
             int(experts), int(top_k), float(temperature), weight.data_ptr<float>(),
             idx.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logits, weight, idx};
}

// route's backward for fp16 / bf16: dz in fp32, then the two GEMMs on tensor cores with dz rounded to
// x's dtype (fp32 accumulation, as every other fp16 / bf16 backward GEMM here). The fp32 GEMMs of
// route_backward_aten first copied x (and G) to fp32: at T = 4096, d_in = 14336 that is 235 MB
// written and read again, and the GEMMs ran without tensor cores.
std::tuple<at::Tensor, at::Tensor> route_backward_cuda(
    const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& grad_weight,
    const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& expert_weight,
    const at::Tensor& expert_idx, double temperature) {
  if (!is_half16(x) || gate_weight.scalar_type() != x.scalar_type()) {
    return route_backward_aten(grad_logits, grad_weight, x, gate_weight, expert_weight, expert_idx, temperature);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor grad_z = route_grad_logits(grad_logits, grad_weight, x, gate_weight.size(0), expert_weight,
                                              expert_idx, temperature, at::kFloat)
                                .to(x.scalar_type());
  return {at::mm(grad_z, gate_weight), at::mm(grad_z.t(), x)};
}

std::tuple<at::Tensor, at::Tensor> lora_experts_cuda(
    const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& scaling, const at::Tensor& expert_idx, const at::Tensor& expert_weight,
    const std::optional<at::Tensor>& base) {
  check_lora_inputs(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base);
  check_cuda_dtype(x, "lora_experts");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = x.size(0), d_in = x.size(1), top_k = expert_idx.size(1);
  const int64_t rank = lora_a.size(1), d_out = lora_b.size(1);
  at::Tensor out = at::empty({tokens, d_out}, x.options());
  at::Tensor hidden = at::empty({tokens, top_k, rank}, x.options().dtype(at::kFloat));
  if (tokens == 0) return {out, hidden};
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous();
  const at::Tensor idx = expert_idx.contiguous();
  const at::Tensor w = expert_weight.to(at::kFloat).contiguous();
  const at::Tensor s = scaling.to(at::kFloat).contiguous();
  at::Tensor base_c;
  if (base.has_value()) base_c = rows_contiguous(base->to(x.scalar_type()));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (is_half16(x) && tokens * top_k > 64 && lora_a.size(0) * rank <= kDenseMaxRows) {
    // Few expert rows (N r <= 512, e.g. 28 x 8): all experts' shrink and expand are two tensor-core
    // GEMMs (cuBLAS) around our select kernel; that beats gathering per tile at this size.
    const int64_t experts = lora_a.size(0), nr = experts * rank;
    const at::Tensor hall = at::mm(x, a.view({nr, d_in}).t(), at::kFloat);
    at::Tensor H = at::empty({tokens, nr}, x.options());
    cuda::select_dense(half16(x), hall.data_ptr<float>(), idx.data_ptr<int64_t>(), w.data_ptr<float>(),
                       s.data_ptr<float>(), tokens, int(experts), int(rank), int(top_k), hidden.data_ptr<float>(),
                       H.data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor b_all = b.permute({1, 0, 2}).reshape({d_out, nr});
    if (base_c.defined()) {
      at::addmm_out(out, base_c, H, b_all.t());
    } else {
      at::mm_out(out, H, b_all.t());
    }
    return {out, hidden};
  }
  if (is_half16(x)) {
    const at::Tensor xc = rows_contiguous(x);
    cuda::shrink(half16(x), xc.data_ptr(), xc.stride(0), tokens, d_in, a.data_ptr(), int(lora_a.size(0)),
                 int(rank), idx.data_ptr<int64_t>(), int(top_k), hidden.data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda::expand(half16(x), hidden.data_ptr<float>(), idx.data_ptr<int64_t>(), int(top_k), tokens,
                 w.data_ptr<float>(), s.data_ptr<float>(), b.data_ptr(), /*transposed=*/false,
                 int(lora_a.size(0)), int(rank), d_out, base_c.defined() ? base_c.data_ptr() : nullptr,
                 base_c.defined() ? base_c.stride(0) : 0, out.data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {out, hidden};
  }
  [&] {  // fp32 (fp16 / bf16 returned above)
    using scalar_t = float;
    shrink_kernel<scalar_t><<<warp_blocks(tokens * top_k), kWarpsPerBlock * kWarp, 0, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), a.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
        tokens * top_k, int(top_k), d_in, int(rank), hidden.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    expand_kernel<scalar_t><<<static_cast<unsigned int>(tokens), 256, 0, stream>>>(
        hidden.data_ptr<float>(), b.data_ptr<scalar_t>(), s.data_ptr<float>(), idx.data_ptr<int64_t>(),
        w.data_ptr<float>(), base_c.defined() ? base_c.data_ptr<scalar_t>() : nullptr, int(top_k), int(rank),
        d_out, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }();
  return {out, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_experts_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_hidden, const at::Tensor& x,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scaling,
    const at::Tensor& expert_idx, const at::Tensor& expert_weight, const at::Tensor& hidden,
    bool need_x, bool need_weight, bool need_lora) {
  check_lora_inputs(x, lora_a, lora_b, scaling, expert_idx, expert_weight, std::nullopt);
  check_cuda_dtype(x, "lora_experts_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = x.size(0), d_in = x.size(1), top_k = expert_idx.size(1);
  const int64_t experts = lora_a.size(0), rank = lora_a.size(1), d_out = lora_b.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == tokens && grad_out.size(1) == d_out,
              "meteora.lora_experts_backward: grad_out must be (T, d_out), got ", grad_out.sizes());
  const auto f32 = x.options().dtype(at::kFloat);
  const at::Tensor empty = at::empty({0}, x.options());
  // Every path below writes all of each gradient; only the nothing-to-compute return needs zeros.
  const bool nothing = tokens == 0 || !(need_x || need_weight || need_lora);
  const auto make = [&](bool need, at::IntArrayRef sizes, const at::TensorOptions& opts) {
    return !need ? empty : (nothing ? at::zeros(sizes, opts) : at::empty(sizes, opts));
  };
  at::Tensor grad_x = make(need_x, {tokens, d_in}, x.options());
  at::Tensor grad_w = make(need_weight, {tokens, top_k}, f32);
  at::Tensor grad_a = make(need_lora, lora_a.sizes(), lora_a.options());
  at::Tensor grad_b = make(need_lora, lora_b.sizes(), lora_b.options());
  if (nothing) {
    return {grad_x, need_weight ? grad_w.to(expert_weight.scalar_type()) : empty, grad_a, grad_b};
  }
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous();
  const at::Tensor idx = expert_idx.contiguous();
  const at::Tensor w = expert_weight.to(at::kFloat).contiguous();
  const at::Tensor s = scaling.to(at::kFloat).contiguous();
  const at::Tensor g = grad_out.to(x.scalar_type()).contiguous();
  const at::Tensor h = hidden.to(at::kFloat).contiguous();
  at::Tensor gh_in;
  if (grad_hidden.has_value()) gh_in = grad_hidden->to(at::kFloat).contiguous();
  at::Tensor grad_h = at::empty({tokens, top_k, rank}, f32);  // dL/dhidden, all terms
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (is_half16(x) && tokens * top_k > 64 && experts * rank <= kDenseMaxRows) {
    // Dense path (see lora_experts_cuda): four tensor-core GEMMs around one select kernel.
    const int64_t nr = experts * rank;
    const at::Tensor b_all = b.permute({1, 0, 2}).reshape({d_out, nr});
    const at::Tensor bt = at::mm(g, b_all, at::kFloat);
    at::Tensor GH = at::empty({tokens, nr}, x.options()), H = at::empty({tokens, nr}, x.options());
    cuda::select_dense_backward(half16(x), bt.data_ptr<float>(), idx.data_ptr<int64_t>(), w.data_ptr<float>(),
                                s.data_ptr<float>(), h.data_ptr<float>(),
                                gh_in.defined() ? gh_in.data_ptr<float>() : nullptr, tokens, int(experts), int(rank),
                                int(top_k), grad_h.data_ptr<float>(), need_weight ? grad_w.data_ptr<float>() : nullptr,
                                GH.data_ptr(), H.data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_x) at::mm_out(grad_x, GH, a.view({nr, d_in}));
    if (need_lora) {
      at::Tensor grad_a_rows = grad_a.view({nr, d_in});
      at::mm_out(grad_a_rows, GH.t(), x);
      grad_b.copy_(at::mm(g.t(), H).view({d_out, experts, rank}).permute({1, 0, 2}));
    }
    return {grad_x, need_weight ? grad_w.to(expert_weight.scalar_type()) : empty, grad_a, grad_b};
  }
  if (is_half16(x)) {
    const auto dt = half16(x);
    cuda::shrink_backward(dt, g.data_ptr(), tokens, d_out, b.data_ptr(), int(experts), int(rank),
                          idx.data_ptr<int64_t>(), int(top_k), w.data_ptr<float>(), s.data_ptr<float>(),
                          h.data_ptr<float>(), gh_in.defined() ? gh_in.data_ptr<float>() : nullptr,
                          grad_h.data_ptr<float>(), need_weight ? grad_w.data_ptr<float>() : nullptr, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_x) {
      cuda::expand(dt, grad_h.data_ptr<float>(), idx.data_ptr<int64_t>(), int(top_k), tokens, nullptr, nullptr,
                   a.data_ptr(), /*transposed=*/true, int(experts), int(rank), d_in, nullptr, 0,
                   grad_x.data_ptr(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_lora) {
      const int64_t pairs = tokens * top_k;
      const auto i32 = x.options().dtype(at::kInt);
      at::Tensor perm = at::empty({pairs}, i32), offsets = at::empty({experts + 1}, i32);
      cuda::sort_pairs(idx.data_ptr<int64_t>(), pairs, int(experts), perm.data_ptr<int>(),
                       offsets.data_ptr<int>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor xc = rows_contiguous(x);
      at::Tensor acc_a = at::zeros({experts, rank, d_in}, f32), acc_b = at::zeros({experts, d_out, rank}, f32);
      cuda::pair_outer(dt, perm.data_ptr<int>(), offsets.data_ptr<int>(), pairs, int(experts), int(rank),
                       int(top_k), grad_h.data_ptr<float>(), nullptr, nullptr, xc.data_ptr(), xc.stride(0), d_in,
                       /*transposed=*/false, acc_a.data_ptr<float>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cuda::pair_outer(dt, perm.data_ptr<int>(), offsets.data_ptr<int>(), pairs, int(experts), int(rank),
                       int(top_k), h.data_ptr<float>(), w.data_ptr<float>(), s.data_ptr<float>(), g.data_ptr(),
                       d_out, d_out, /*transposed=*/true, acc_b.data_ptr<float>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_a.copy_(acc_a);
      grad_b.copy_(acc_b);
    }
    return {grad_x, need_weight ? grad_w.to(expert_weight.scalar_type()) : empty, grad_a, grad_b};
  }
  [&] {  // fp32 (fp16 / bf16 returned above)
    using scalar_t = float;
    backward_pair_kernel<scalar_t><<<warp_blocks(tokens * top_k), kWarpsPerBlock * kWarp, 0, stream>>>(
        g.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), s.data_ptr<float>(), idx.data_ptr<int64_t>(),
        w.data_ptr<float>(), h.data_ptr<float>(), gh_in.defined() ? gh_in.data_ptr<float>() : nullptr,
        tokens * top_k, int(top_k), int(rank), d_out, need_weight ? grad_w.data_ptr<float>() : nullptr,
        grad_h.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_x) {
      grad_x_kernel<scalar_t><<<static_cast<unsigned int>(tokens), 256, 0, stream>>>(
          grad_h.data_ptr<float>(), a.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), int(top_k), int(rank),
          d_in, grad_x.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }();
  if (need_lora) {
    // dA[e] = sum over pairs routed to e of grad_h^T x;  dB[e] = sum of g (w s hidden)^T.
    // First version: scatter the pairs into dense (T, N, r) and use one GEMM each.
    const at::Tensor index = idx.unsqueeze(-1).expand({tokens, top_k, rank});
    const at::Tensor gh_dense = at::zeros({tokens, experts, rank}, f32).scatter_(1, index, grad_h);
    const at::Tensor coef = w * s.index_select(0, idx.reshape({-1})).view({tokens, top_k});
    const at::Tensor hc_dense = at::zeros({tokens, experts, rank}, f32).scatter_(1, index, h * coef.unsqueeze(-1));
    grad_a.copy_(at::matmul(gh_dense.view({tokens, experts * rank}).t(), x.to(at::kFloat))
                     .view({experts, rank, d_in}));
    grad_b.copy_(at::matmul(g.to(at::kFloat).t(), hc_dense.view({tokens, experts * rank}))
                     .view({d_out, experts, rank}).permute({1, 0, 2}));
  }
  return {grad_x, need_weight ? grad_w.to(expert_weight.scalar_type()) : empty, grad_a, grad_b};
}

// Largest T for which meteora.linear routes and sums the experts per output column in one kernel.
constexpr int64_t kFusedMaxTokens = 32;

// A high-priority side stream per device (and host thread) for meteora.linear's routing work, with
// the two events that fork it from and join it to the current stream (graph capture turns them
// into graph edges).
struct Overlap {
  explicit Overlap(c10::DeviceIndex device) : side(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device)) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&fork_event, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&join_event, cudaEventDisableTiming));
  }
  Overlap(const Overlap&) = delete;
  Overlap& operator=(const Overlap&) = delete;
  ~Overlap() {  // at thread exit; errors there are ignored
    cudaEventDestroy(fork_event);
    cudaEventDestroy(join_event);
    for (cudaEvent_t e : base_done) cudaEventDestroy(e);
  }
  // The side stream waits for work recorded on `from` so far (the i-th of one call's such waits:
  // each has an event of its own, so a later record cannot overtake a wait not yet enqueued).
  void side_waits(cudaStream_t from, size_t i) {
    while (base_done.size() <= i) {
      cudaEvent_t e = nullptr;
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      base_done.push_back(e);
    }
    C10_CUDA_CHECK(cudaEventRecord(base_done[i], from));
    C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), base_done[i], 0));
  }
  void fork(cudaStream_t from) const {
    C10_CUDA_CHECK(cudaEventRecord(fork_event, from));
    C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), fork_event, 0));
  }
  void join(cudaStream_t into) const {
    C10_CUDA_CHECK(cudaEventRecord(join_event, side.stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(into, join_event, 0));
  }
  // Points `blas` at the side stream and its own cuBLAS workspace (kSideWorkspace bytes, made at
  // first use): see side_gemm.
  void blas_on_side(cublasHandle_t blas) {
    if (!space) space = c10::cuda::CUDACachingAllocator::get()->allocate(kSideWorkspace);
    TORCH_CUDABLAS_CHECK(cublasSetStream(blas, side.stream()));
    TORCH_CUDABLAS_CHECK(cublasSetWorkspace(blas, space.get(), kSideWorkspace));
  }
  static constexpr size_t kSideWorkspace = size_t(16) << 20;
  c10::cuda::CUDAStream side;
  cudaEvent_t fork_event = nullptr, join_event = nullptr;
  std::vector<cudaEvent_t> base_done;
  at::DataPtr space;
};

Overlap& overlap_for(c10::DeviceIndex device) {
  thread_local std::vector<std::unique_ptr<Overlap>> per_device;
  if (per_device.size() <= size_t(device)) per_device.resize(size_t(device) + 1);
  auto& slot = per_device[size_t(device)];
  if (!slot) slot = std::make_unique<Overlap>(device);
  return *slot;
}

// out (T, ld) fp32 = x rows^T with cuBLAS on the stream `blas` is set to (bf16 / fp16 products are
// exact in fp32). Strided x goes through at::mm (on the current stream).
void rows_gemm(cublasHandle_t blas, const at::Tensor& x, const at::Tensor& rows_m, at::Tensor& out) {
  const int64_t tokens = x.size(0), d_in = x.size(1), rows = rows_m.size(0);
  const int64_t ldx = tokens == 1 ? std::max<int64_t>(x.stride(0), d_in) : x.stride(0);
  const int64_t limit = std::numeric_limits<int>::max();
  if (x.stride(1) != 1 || rows_m.stride(1) != 1 || ldx < d_in || rows_m.stride(0) < d_in || out.stride(1) != 1 ||
      tokens > limit || ldx > limit || rows_m.stride(0) > limit || out.stride(0) > limit || rows > limit) {
    at::mm_out(out, x, rows_m.t(), at::kFloat);
    return;
  }
  const cudaDataType_t dt = x.scalar_type() == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
  const float one = 1.f, zero = 0.f;
  // Column-major: out^T (rows x T, ld) = rows_m (d_in x rows)^T x (d_in x T).
  TORCH_CUDABLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(rows), int(tokens), int(d_in), &one,
                                    rows_m.data_ptr(), dt, int(rows_m.stride(0)), x.data_ptr(), dt, int(ldx), &zero,
                                    out.data_ptr(), CUDA_R_32F, int(out.stride(0)), CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
}

// meteora.linear's routing GEMM on the side stream: hall (T, ld) fp32 = x ext^T, with the side
// stream's own 16 MiB cuBLAS workspace. at::mm there would give that stream torch's workspaces of a
// new stream (32 MiB for cuBLAS on Hopper, 1 MiB for cuBLASLt: H200 e2e, 17 MiB more than this).
// `blas` is torch's handle of this thread, taken while the main stream was current; torch sets its
// stream and workspace again at its next use (getCurrentCUDABlasHandle does at every call).
void side_gemm(cublasHandle_t blas, Overlap& ov, const at::Tensor& x, const at::Tensor& ext, at::Tensor& hall) {
  ov.blas_on_side(blas);
  rows_gemm(blas, x, ext, hall);
}

// The prefill expand on the side stream: out (T, d_out) += H (T, N r) B_all^T, with the side
// stream's workspace (see side_gemm). False (nothing done) for layouts it does not take.
bool side_expand(cublasHandle_t blas, Overlap& ov, const at::Tensor& H, const at::Tensor& b_all, at::Tensor& out) {
  const int64_t limit = std::numeric_limits<int>::max();
  if (H.stride(1) != 1 || b_all.stride(1) != 1 || out.stride(1) != 1 || H.stride(0) < H.size(1) ||
      b_all.stride(0) < b_all.size(1) || out.stride(0) < out.size(1) || out.size(0) > limit || out.size(1) > limit ||
      H.stride(0) > limit || b_all.stride(0) > limit || out.stride(0) > limit || H.size(1) > limit) {
    return false;
  }
  const cudaDataType_t dt = out.scalar_type() == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
  const float one = 1.f;
  ov.blas_on_side(blas);
  // Column-major: out^T (d_out x T, ld) += B_all (N r x d_out, ld)^T x H^T (N r x T, ld).
  TORCH_CUDABLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(out.size(1)), int(out.size(0)),
                                    int(H.size(1)), &one, b_all.data_ptr(), dt, int(b_all.stride(0)), H.data_ptr(),
                                    dt, int(H.stride(0)), &one, out.data_ptr(), dt, int(out.stride(0)),
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return true;
}

// One linear of a meteora.linear / linear_group call on CUDA: its inputs, checked, and what it
// allocates on the current stream (the side stream only computes into it).
struct Member {
  Member(const at::Tensor& x, const at::Tensor& base_weight, const std::optional<at::Tensor>& base_bias,
         const at::Tensor& gate_weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
         const at::Tensor& scaling, const std::optional<at::Tensor>& expert_mask, int64_t top_k, double temperature)
      : base_weight(base_weight), base_bias(base_bias), top_k(top_k), temperature(temperature) {
    check_route_inputs(x, gate_weight, expert_mask, top_k, temperature);
    check_linear_base(x, base_weight, base_bias);
    check_linear_experts(x, base_weight, gate_weight, lora_a, lora_b, scaling);
    experts = gate_weight.size(0);
    rank = lora_a.size(1);
    nr = experts * rank;
    d_out = base_weight.size(0);
    d_in = x.size(1);
    if (expert_mask.has_value()) mask = expert_mask->contiguous();
    s = scaling.to(at::kFloat).contiguous();
    // The experts' B may be kept as columns of a (d_out, ldb) row-major buffer (b[e, n, c] at
    // n ldb + e r + c; MeteoRALinear.pack_(base=True)): then B_all (d_out, N r) is a view of it, and
    // when those columns follow W0's in the same rows ("wide": [W0 | B_all] (d_out, d_in + N r)),
    // the prefill base GEMM and the experts' expand are one GEMM of [x | H] with them.
    b_rows = (rank == 1 || lora_b.stride(2) == 1) && lora_b.stride(1) >= nr && (experts == 1 || lora_b.stride(0) == rank);
    ldb = lora_b.stride(1);
    // "left": B's columns right before W0's ([B_all | W0]): the first of a gate / up pair, whose [H | x]
    // then shares x with the other's [x | H] in one [H_gate | x | H_up] buffer (run_wide).
    const bool one_buffer = b_rows && base_weight.stride(1) == 1 && base_weight.stride(0) == ldb &&
                            ldb >= d_in + nr && lora_b.is_alias_of(base_weight);
    left = one_buffer && base_weight.storage_offset() == lora_b.storage_offset() + nr;
    wide = left || (one_buffer && lora_b.storage_offset() == base_weight.storage_offset() + d_in);
    b = b_rows ? lora_b : lora_b.contiguous();
  }
  // Outputs and work buffers for T tokens: decode-sized T (fused) routes and expands into delta
  // (T, d_out) fp32; larger T selects into H (T, N r) for the expand GEMM with B_all.
  void allocate(const at::Tensor& x, bool fused) {
    allocate_routing(x);
    const int64_t tokens = x.size(0);
    if (fused) {
      delta = at::empty({tokens, d_out}, x.options().dtype(at::kFloat));
    } else {
      H = at::empty({tokens, nr}, x.options());
      b_all = b_rows ? b.as_strided({d_out, nr}, {ldb, 1}, b.storage_offset()) : at::empty({d_out, nr}, x.options());
    }
  }
  // The routing's outputs: logits (T, N), weight (T, k) fp32 and idx (T, k).
  void allocate_routing(const at::Tensor& x) {
    const int64_t tokens = x.size(0);
    logits = at::empty({tokens, experts}, x.options().dtype(at::kFloat));
    weight = at::empty({tokens, top_k}, x.options().dtype(at::kFloat));
    idx = at::empty({tokens, top_k}, x.options().dtype(at::kLong));
  }
  // Decode sizes: the routing from hall's columns [col, col + N + N r) and the expand into delta, as
  // one piece of a route_expand launch (every member's in one).
  // Stacked (base_col >= 0): hall also holds this linear's base output from column base_col, and the
  // piece writes `out` (allocated here) = base + bias + the experts' sum.
  cuda::RoutePiece route_piece(const at::Tensor& hall, int64_t col, int64_t base_col = -1) {
    cuda::RoutePiece p{hall.data_ptr<float>() + col, hall.stride(0), mask.defined() ? mask.data_ptr<bool>() : nullptr,
                       int(experts), int(rank), int(top_k), float(temperature), s.data_ptr<float>(), b.data_ptr(),
                       b.stride(0), b.stride(1), d_out, delta.defined() ? delta.data_ptr<float>() : nullptr,
                       logits.data_ptr<float>(), weight.data_ptr<float>(), idx.data_ptr<int64_t>()};
    if (base_col >= 0) {
      out = at::empty({hall.size(0), d_out}, base_weight.options());
      p.base = hall.data_ptr<float>() + base_col;
      p.bias = base_bias.has_value() ? base_bias->data_ptr() : nullptr;
      p.out = out.data_ptr();
    }
    return p;
  }
  // Larger T: the routing from hall's columns [col, col + N + N r) and the selection H, as one piece
  // of a route_select launch (every member's in one): route_piece's routing fields, and H.
  cuda::RoutePiece select_piece(const at::Tensor& hall, int64_t col) {
    cuda::RoutePiece p = route_piece(hall, col);
    p.H = H.data_ptr();
    p.ldh = H.stride(0);
    return p;
  }
  // B_all for a layout that does not keep B's columns (on the current stream).
  void copy_b() {
    if (!b_rows) b_all.view({d_out, experts, rank}).copy_(b.permute({1, 0, 2}));
  }
  at::Tensor base_gemm(const at::Tensor& x) const {
    return base_bias.has_value() ? at::addmm(*base_bias, x, base_weight.t()) : at::mm(x, base_weight.t());
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result() const { return {out, logits, weight, idx}; }

  at::Tensor base_weight;
  std::optional<at::Tensor> base_bias;
  int64_t top_k;
  double temperature;
  int64_t experts = 0, rank = 0, nr = 0, d_out = 0, d_in = 0, ldb = 0;
  bool b_rows = false, wide = false, left = false;
  at::Tensor mask, s, b, b_all, H, delta, logits, weight, idx, out;
};

// Prefill with the fused expand (csrc/cuda/fused_expand.h) is opt-in: METEORA_FUSED_EXPAND=1 runs it
// at every prefill size (T > 32), =N from N tokens, unset or 0 never (read at each call, so A/B runs
// can toggle it). H200 (benchmarks/results/h200_fused_expand): the LLaMA-3-8B layer alternated with
// base, in short bursts, gains 3.8% at T = 4096 and 1.1% at 8192 (loses 13.5% at 1024, where the
// routing it must wait for costs more than it saves), but the whole model's prefill, which runs the
// GPU at its 700 W cap, loses 2-4% (0.888 -> 0.868-0.874 at 1 x 4096, 0.885 -> 0.849-0.851 at
// 8 x 1024): the CUTLASS kernels draw more power, and the cap lowers the clock (median 1695 vs
// 1755 MHz) for every kernel of the forward.
std::atomic<int64_t> fused_expand_launches_{0};  // since load: _C.fused_expand_launches()

int64_t fused_expand_min_tokens() {
  const char* v = std::getenv("METEORA_FUSED_EXPAND");
  if (v == nullptr || *v == '\0') return std::numeric_limits<int64_t>::max();
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK(*end == '\0' && n >= 0, "METEORA_FUSED_EXPAND must be 0 (off), 1 (every prefill size) or a token count, got '", v, "'");
  return n == 0 ? std::numeric_limits<int64_t>::max() : std::max<int64_t>(n, kFusedMaxTokens + 1);
}

#ifdef METEORA_WITH_FUSED_EXPAND
// The fused GEMM's operands for member m (H and B_all allocated, out too).
cuda::FusedExpandArgs fused_args(const at::Tensor& x, const Member& m, int sm_count) {
  cuda::FusedExpandArgs a;
  a.tokens = x.size(0);
  a.d_out = m.d_out;
  a.d_in = m.d_in;
  a.nr = m.nr;
  a.x = x.data_ptr();
  a.ldx = x.stride(0);
  a.w0 = m.base_weight.data_ptr();
  a.ldw = m.base_weight.stride(0);
  a.h = m.H.data_ptr();
  a.ldh = m.H.stride(0);
  a.b = m.b_all.data_ptr();
  a.ldb = m.b_all.stride(0);
  a.out = m.out.data_ptr();
  a.ldo = m.out.stride(0);
  a.half = x.scalar_type() == at::kHalf;
  a.sm_count = sm_count;
  return a;
}
#endif

// The fused GEMMs' operands, one per member, when every member can run it: an sm_90 device, no bias,
// B as columns, unit column strides, the kernel's alignment (each member's prefill outputs and `out`
// allocated); empty otherwise.
std::vector<cuda::FusedExpandArgs> fused_plan(const at::Tensor& x, std::vector<Member>& members) {
  if (x.size(0) < fused_expand_min_tokens()) return {};
#ifdef METEORA_WITH_FUSED_EXPAND
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major != 9 || prop->minor != 0) {
    TORCH_WARN_ONCE("meteora: METEORA_FUSED_EXPAND is set, but the fused prefill GEMM runs on sm_90 only (this GPU: sm_",
                    prop->major, prop->minor, "); running the unfused path");
    return {};
  }
  if (!is_half16(x) || x.stride(1) != 1) return {};
  for (auto& m : members) {
    if (m.base_bias.has_value() || m.wide || !m.b_rows || m.base_weight.stride(1) != 1 ||
        m.base_weight.scalar_type() != x.scalar_type()) {
      return {};
    }
  }
  std::vector<cuda::FusedExpandArgs> plan;
  for (auto& m : members) {
    m.allocate(x, false);
    m.out = at::empty({x.size(0), m.d_out}, x.options());
    plan.push_back(fused_args(x, m, prop->multiProcessorCount));
    if (!cuda::fused_expand_supported(plan.back())) return {};
  }
  return plan;
#else
  (void)members;
  TORCH_WARN_ONCE("meteora: METEORA_FUSED_EXPAND is set, but this build has no fused prefill GEMM (it needs 9.x "
                  "in TORCH_CUDA_ARCH_LIST and CUTLASS's headers at build time); running the unfused path");
  return {};
#endif
}

// Prefill with the fused expand, on the current stream: the routing GEMM, every member's selection H,
// then one GEMM per member (plan: fused_plan's), out = x W0^T + H B_all^T.
void run_fused(const at::Tensor& x, const at::Tensor& ext, std::vector<Member>& members,
               const std::vector<int64_t>& cols, const std::vector<cuda::FusedExpandArgs>& plan) {
  const int64_t tokens = x.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor hall = at::empty({tokens, ext.size(0)}, x.options().dtype(at::kFloat));
  rows_gemm(at::cuda::getCurrentCUDABlasHandle(), x, ext, hall);
  std::vector<cuda::RoutePiece> pieces;
  for (size_t i = 0; i < members.size(); ++i) pieces.push_back(members[i].select_piece(hall, cols[i]));
  cuda::route_select(half16(x), pieces.data(), int(pieces.size()), tokens, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  size_t bytes = 1;
  for (const auto& a : plan) bytes = std::max(bytes, cuda::fused_expand_workspace(a));
  const at::Tensor space = at::empty({int64_t(bytes)}, x.options().dtype(at::kByte));  // the GEMMs run in turn
  for (const auto& a : plan) {
    TORCH_CHECK(cuda::fused_expand(a, space.data_ptr(), stream), "meteora.linear: the fused prefill GEMM failed (",
                a.tokens, " x ", a.d_in, " -> ", a.d_out, ", N r = ", a.nr, ")");
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fused_expand_launches_.fetch_add(1, std::memory_order_relaxed);
  }
}

// The routing side (one GEMM of x with `ext`, every member's [gate; A_all] rows, member i's
// starting at column cols[i] of its result; then each member's routing with the experts' expand at
// decode sizes, or the selection at prefill sizes, then each member's expand GEMM as soon as its
// base output exists) runs on a side stream while the base GEMMs run on the current one; decode
// joins before each member's experts' sum is added to its base output.
void run_members(const at::Tensor& x, const at::Tensor& ext, std::vector<Member>& members,
                 const std::vector<int64_t>& cols) {
  const int64_t tokens = x.size(0);
  const bool fused = tokens <= kFusedMaxTokens;
  if (!fused) {
    const std::vector<cuda::FusedExpandArgs> plan = fused_plan(x, members);
    if (!plan.empty()) {
      run_fused(x, ext, members, cols, plan);
      return;
    }
  }
  at::Tensor hall = at::empty({tokens, ext.size(0)}, x.options().dtype(at::kFloat));
  for (auto& m : members) m.allocate(x, fused);
  auto main_stream = c10::cuda::getCurrentCUDAStream();
  Overlap& ov = overlap_for(x.device().index());
  cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();  // while the main stream is current
  ov.fork(main_stream.stream());
  {
    const c10::cuda::CUDAStreamGuard on_side(ov.side);
    // fp16 / bf16 products are exact in fp32: the logits are the reference's fp32 logits.
    side_gemm(blas, ov, x, ext, hall);
    // every member's routing, then its expand (decode) or its selection H (prefill), in one launch
    std::vector<cuda::RoutePiece> pieces;
    for (size_t i = 0; i < members.size(); ++i) {
      pieces.push_back(fused ? members[i].route_piece(hall, cols[i]) : members[i].select_piece(hall, cols[i]));
    }
    (fused ? cuda::route_expand : cuda::route_select)(half16(x), pieces.data(), int(pieces.size()), tokens,
                                                      ov.side.stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!fused) {
      for (auto& m : members) m.copy_b();
    }
  }
  if (fused) {  // every member's delta added by one kernel after the join
    std::vector<cuda::DeltaPiece> pieces;
    for (auto& m : members) {
      m.out = m.base_gemm(x);
      pieces.push_back({m.out.data_ptr(), m.delta.data_ptr<float>(), m.out.numel()});
    }
    ov.join(main_stream.stream());
    cuda::add_delta(half16(x), pieces.data(), int(pieces.size()), main_stream.stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Prefill: each member's expand on the side stream once its base GEMM is done, beside the next
  // member's base GEMM (a memory-bound GEMM beside a compute-bound one; H200 layer, graph replay:
  // 1-2% less than every expand after the join, the same bits). A layout side_expand does not
  // take adds its sum after the join.
  std::vector<bool> pending(members.size(), false);
  for (size_t i = 0; i < members.size(); ++i) {
    Member& m = members[i];
    m.out = m.base_gemm(x);
    ov.side_waits(main_stream.stream(), i);
    pending[i] = !side_expand(blas, ov, m.H, m.b_all, m.out);
  }
  ov.join(main_stream.stream());
  for (size_t i = 0; i < members.size(); ++i) {
    if (pending[i]) members[i].out.addmm_(members[i].H, members[i].b_all.t());
  }
}

// x given inside a wider buffer that may be written around it (meteora.linear_group_in):
// x = x_cat[:, col : col + x.size(1)].
struct GivenInput {
  at::Tensor x_cat;
  int64_t col;
};

// Wide prefill (every member's B columns beside its W0's in the same rows: [W0 | B_all], or
// [B_all | W0] ("left")). The side stream runs the routing GEMM for every member and one route_select
// launch, which writes each member's selection H next to a copy of x that the current stream makes
// meanwhile: [x | H] for [W0 | B_all], [H | x] for [B_all | W0], and one [H_a | x | H_b] for a left
// member a followed by a member b, so that such a pair (gate / up) copies x once. After the join,
// one GEMM of [x | H] with [W0 | B_all] (or [H | x] with [B_all | W0]) per member gives
// x W0^T + H B_all^T (+ bias) with one pass over the output (no second, in-place expand GEMM).
// With `given`, the first pair whose H fit on either side of x there uses that buffer, no copy.
void run_wide(const at::Tensor& x, const at::Tensor& ext, std::vector<Member>& members,
              const std::vector<int64_t>& cols, const GivenInput* given = nullptr) {
  const int64_t tokens = x.size(0), d_in = x.size(1);
  const auto up8 = [](int64_t n) { return (n + 7) / 8 * 8; };
  at::Tensor hall = at::empty({tokens, ext.size(0)}, x.options().dtype(at::kFloat));
  std::vector<at::Tensor> x_cat;  // each holds x at column x_col[j]: a copy, unless in_place[j] (given's)
  std::vector<int64_t> x_col;
  std::vector<bool> in_place;
  std::vector<size_t> input(members.size());  // member i's buffer in x_cat
  bool given_used = false;
  for (size_t i = 0; i < members.size(); ++i) {
    Member& m = members[i];
    m.allocate_routing(x);
    if (i > 0 && members[i - 1].left && !m.left) continue;  // placed with the left member before it
    const bool pair = m.left && i + 1 < members.size() && !members[i + 1].left;
    // A left member's H right before x, the next member's (pair) or this one's right after it.
    const int64_t after = m.left ? (pair ? members[i + 1].nr : 0) : m.nr;
    const bool use_given = pair && given != nullptr && !given_used && given->col >= m.nr &&
                           given->col + d_in + after <= given->x_cat.size(1);
    given_used = given_used || use_given;
    const int64_t col = use_given ? given->col : m.left ? up8(m.nr) : 0;  // x at a multiple of 8 columns
    x_cat.push_back(use_given ? given->x_cat : at::empty({tokens, up8(col + d_in + after)}, x.options()));
    x_col.push_back(col);
    in_place.push_back(use_given);
    m.H = x_cat.back().narrow(1, m.left ? col - m.nr : col + d_in, m.nr);
    input[i] = x_cat.size() - 1;
    if (pair) {
      members[i + 1].H = x_cat.back().narrow(1, col + d_in, members[i + 1].nr);
      input[i + 1] = input[i];
    }
  }
  auto main_stream = c10::cuda::getCurrentCUDAStream();
  Overlap& ov = overlap_for(x.device().index());
  cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();
  ov.fork(main_stream.stream());
  {
    const c10::cuda::CUDAStreamGuard on_side(ov.side);
    side_gemm(blas, ov, x, ext, hall);
    std::vector<cuda::RoutePiece> pieces;
    for (size_t i = 0; i < members.size(); ++i) pieces.push_back(members[i].select_piece(hall, cols[i]));
    cuda::route_select(half16(x), pieces.data(), int(pieces.size()), tokens, ov.side.stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (size_t j = 0; j < x_cat.size(); ++j) {
    at::Tensor& xc = x_cat[j];
    if (in_place[j]) continue;  // x is there already
    if (x.stride(1) == 1) {  // 16-byte copies where aligned (copy_ into the strided columns ran at a quarter speed)
      cuda::copy_rows(static_cast<char*>(xc.data_ptr()) + x_col[j] * xc.element_size(), xc.stride(0), x.data_ptr(),
                      x.stride(0), tokens, d_in, main_stream.stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      xc.narrow(1, x_col[j], d_in).copy_(x);
    }
  }
  ov.join(main_stream.stream());
  for (size_t i = 0; i < members.size(); ++i) {
    Member& m = members[i];
    const at::Tensor& xc = x_cat[input[i]];
    const int64_t k = d_in + m.nr, a_col = m.left ? x_col[input[i]] - m.nr : x_col[input[i]];
    const at::Tensor a = xc.narrow(1, a_col, k);
    const at::Tensor w = m.base_weight.as_strided(
        {m.d_out, k}, {m.ldb, 1}, m.left ? m.b.storage_offset() : m.base_weight.storage_offset());
    m.out = m.base_bias.has_value() ? at::addmm(*m.base_bias, a, w.t()) : at::mm(a, w.t());
  }
}

// Whether the members' base weights, in x's dtype, contiguous (bias, if any, too), are consecutive
// blocks of the buffer whose [gate; A] rows start at storage offset `first`, the last ending there
// ([W0_1; ...; W0_m; gate_1; A_1; ...]: the stacked layout of MeteoRALinear / LinearGroup pack_):
// the storage offset of the first block, else -1.
int64_t stacked_start(const at::Tensor& x, const std::vector<Member>& members, const at::Tensor& owner, int64_t first) {
  std::vector<const Member*> order;
  for (const auto& m : members) {
    const at::Tensor& w = m.base_weight;
    if (!w.is_contiguous() || !w.is_alias_of(owner) || w.scalar_type() != x.scalar_type() ||
        (m.base_bias.has_value() && (m.base_bias->scalar_type() != x.scalar_type() || !m.base_bias->is_contiguous())))
      return -1;
    order.push_back(&m);
  }
  std::sort(order.begin(), order.end(), [](const Member* a, const Member* b) {
    return a->base_weight.storage_offset() < b->base_weight.storage_offset();
  });
  const int64_t start = order[0]->base_weight.storage_offset();
  int64_t end = start;
  for (const Member* m : order) {
    if (m->base_weight.storage_offset() != end) return -1;
    end += m->base_weight.numel();
  }
  return end == first ? start : -1;
}

// Decode sizes with the stacked layout: one GEMM of x with every row of the stack (each member's
// W0, gate and A) on the current stream, fp32 out, then one route_expand launch that routes each
// token and writes every member's output = base + bias + its experts' sum (one rounding). No side
// stream, no add_delta.
void run_stacked(const at::Tensor& x, const at::Tensor& stack, std::vector<Member>& members,
                 const std::vector<int64_t>& base_cols, const std::vector<int64_t>& cols) {
  const int64_t tokens = x.size(0);
  at::Tensor y = at::empty({tokens, stack.size(0)}, x.options().dtype(at::kFloat));
  rows_gemm(at::cuda::getCurrentCUDABlasHandle(), x, stack, y);
  std::vector<cuda::RoutePiece> pieces;
  for (size_t i = 0; i < members.size(); ++i) {
    members[i].allocate_routing(x);
    pieces.push_back(members[i].route_piece(y, cols[i], base_cols[i]));
  }
  cuda::route_expand(half16(x), pieces.data(), int(pieces.size()), tokens, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool half16_operands(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& lora_a,
                     const at::Tensor& lora_b) {
  return is_half16(x) && x.dim() == 2 && gate_weight.scalar_type() == x.scalar_type() &&
         lora_a.scalar_type() == x.scalar_type() && lora_b.scalar_type() == x.scalar_type();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cuda(
    const at::Tensor& x, const at::Tensor& base_weight, const std::optional<at::Tensor>& base_bias,
    const at::Tensor& gate_weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& scaling, const std::optional<at::Tensor>& expert_mask, int64_t top_k,
    double temperature) {
  if (!half16_operands(x, gate_weight, lora_a, lora_b)) {  // fp32 / fp64, or mixed dtypes (the checks there name them)
    return linear_composite(x, base_weight, base_bias, gate_weight, lora_a, lora_b, scaling, expert_mask, top_k,
                            temperature);
  }
  Member m(x, base_weight, base_bias, gate_weight, lora_a, lora_b, scaling, expert_mask, top_k, temperature);
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.size(0) == 0) {
    m.allocate(x, /*fused=*/true);
    m.out = m.base_gemm(x);
    return m.result();
  }
  // [gate; A_all], rows up to a multiple of 8: a view of the layer's packed buffer, else a copy.
  const at::Tensor ext = gate_lora_rows(gate_weight, lora_a, 8);
  const bool wide = m.wide && x.size(0) > kFusedMaxTokens;
  std::vector<Member> members{std::move(m)};
  if (wide) {
    run_wide(x, ext, members, {0});
    return members[0].result();
  }
  if (x.size(0) <= kFusedMaxTokens && gate_lora_adjacent(gate_weight, lora_a) && ext.is_alias_of(gate_weight)) {
    const int64_t d_in = x.size(1), first = gate_weight.storage_offset();
    const int64_t start = stacked_start(x, members, gate_weight, first);
    if (start >= 0) {
      const int64_t rows = (first - start) / d_in + ext.size(0);
      run_stacked(x, gate_weight.as_strided({rows, d_in}, {d_in, 1}, start), members, {0}, {(first - start) / d_in});
      return members[0].result();
    }
  }
  run_members(x, ext, members, {0});
  return members[0].result();
}

// meteora.linear_group on CUDA: one routing GEMM for every member when their [gate; A] rows are
// consecutive blocks (each padded to a multiple of 8 rows) of one buffer (at prefill sizes with
// every member wide, or none: run_wide, run_members); otherwise, or for fp32 / mixed dtypes, T = 0
// or wide and other members together at prefill sizes, one meteora.linear per member.
std::vector<at::Tensor> linear_group_impl(
    const at::Tensor& x, at::TensorList base_weight, const c10::List<std::optional<at::Tensor>>& base_bias,
    at::TensorList gate_weight, at::TensorList lora_a, at::TensorList lora_b, at::TensorList scaling,
    const c10::List<std::optional<at::Tensor>>& expert_mask, at::IntArrayRef top_k, at::ArrayRef<double> temperature,
    const GivenInput* given) {
  const int64_t n = check_group_lists(base_weight, base_bias, gate_weight, lora_a, lora_b, scaling, expert_mask,
                                      top_k, temperature);
  const auto each = [&] {
    return linear_group_each(x, base_weight, base_bias, gate_weight, lora_a, lora_b, scaling, expert_mask, top_k,
                             temperature);
  };
  if (x.dim() != 2 || x.size(0) == 0) return each();
  for (int64_t i = 0; i < n; ++i) {
    if (!half16_operands(x, gate_weight[i], lora_a[i], lora_b[i]) || !gate_lora_adjacent(gate_weight[i], lora_a[i]) ||
        !gate_weight[i].is_alias_of(gate_weight[0]) || gate_weight[i].size(1) != x.size(1)) {
      return each();
    }
  }
  std::vector<Member> members;
  members.reserve(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    members.emplace_back(x, base_weight[i], base_bias.get(i), gate_weight[i], lora_a[i], lora_b[i], scaling[i],
                         expert_mask.get(i), top_k[i], temperature[i]);
  }
  int64_t wide = 0;
  for (const auto& m : members) wide += m.wide;
  const bool prefill = x.size(0) > kFusedMaxTokens;
  if (prefill && wide != 0 && wide != n) return each();
  // The members' blocks, in buffer order, must follow each other: [gate_i; A_i; zero rows to 8].
  const int64_t d_in = x.size(1);
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[size_t(i)] = i;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return gate_weight[a].storage_offset() < gate_weight[b].storage_offset();
  });
  const int64_t first = gate_weight[order[0]].storage_offset();
  int64_t end = first;
  for (const int64_t i : order) {
    if (gate_weight[i].storage_offset() != end) return each();
    end += (members[size_t(i)].experts + members[size_t(i)].nr + 7) / 8 * 8 * d_in;
  }
  if (int64_t(gate_weight[0].storage().nbytes()) < end * int64_t(gate_weight[0].element_size())) return each();
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t start = x.size(0) <= kFusedMaxTokens ? stacked_start(x, members, gate_weight[0], first) : -1;
  const int64_t top = start >= 0 ? start : first;  // the first row that the GEMM reads
  const at::Tensor rows = gate_weight[0].as_strided({(end - top) / d_in, d_in}, {d_in, 1}, top);
  std::vector<int64_t> cols(static_cast<size_t>(n)), base_cols(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    cols[size_t(i)] = (gate_weight[i].storage_offset() - top) / d_in;
    base_cols[size_t(i)] = (base_weight[i].storage_offset() - top) / d_in;
  }
  if (start >= 0) {
    run_stacked(x, rows, members, base_cols, cols);
  } else if (prefill && wide == n) {
    run_wide(x, rows, members, cols, given);
  } else {
    run_members(x, rows, members, cols);
  }
  std::vector<at::Tensor> outs;
  outs.reserve(size_t(4 * n));
  for (const auto& m : members) outs.insert(outs.end(), {m.out, m.logits, m.weight, m.idx});
  return outs;
}

std::vector<at::Tensor> linear_group_cuda(
    const at::Tensor& x, at::TensorList base_weight, const c10::List<std::optional<at::Tensor>>& base_bias,
    at::TensorList gate_weight, at::TensorList lora_a, at::TensorList lora_b, at::TensorList scaling,
    const c10::List<std::optional<at::Tensor>>& expert_mask, at::IntArrayRef top_k, at::ArrayRef<double> temperature) {
  return linear_group_impl(x, base_weight, base_bias, gate_weight, lora_a, lora_b, scaling, expert_mask, top_k,
                           temperature, nullptr);
}

// meteora.linear_group_in on CUDA: linear_group on the view, whose wide pair (gate / up) writes its
// selections beside x in x_cat instead of copying x (run_wide).
std::vector<at::Tensor> linear_group_in_cuda(
    const at::Tensor& x_cat, int64_t x_col, int64_t d_in, at::TensorList base_weight,
    const c10::List<std::optional<at::Tensor>>& base_bias, at::TensorList gate_weight, at::TensorList lora_a,
    at::TensorList lora_b, at::TensorList scaling, const c10::List<std::optional<at::Tensor>>& expert_mask,
    at::IntArrayRef top_k, at::ArrayRef<double> temperature) {
  const at::Tensor x = group_input(x_cat, x_col, d_in);
  const GivenInput given{x_cat, x_col};
  const bool usable = x_cat.stride(1) == 1 && x_cat.stride(0) >= x_cat.size(1);
  return linear_group_impl(x, base_weight, base_bias, gate_weight, lora_a, lora_b, scaling, expert_mask, top_k,
                           temperature, usable ? &given : nullptr);
}

}  // namespace

int64_t fused_expand_launches() { return fused_expand_launches_.load(std::memory_order_relaxed); }

TORCH_LIBRARY_IMPL(meteora, CUDA, m) {
  m.impl("linear", &linear_cuda);
  m.impl("linear_group", &linear_group_cuda);
  m.impl("linear_group_in", &linear_group_in_cuda);
  m.impl("route", &route_cuda);
  m.impl("route_backward", &route_backward_cuda);
  m.impl("lora_experts", &lora_experts_cuda);
  m.impl("lora_experts_backward", &lora_experts_backward_cuda);
}

}  // namespace meteora
