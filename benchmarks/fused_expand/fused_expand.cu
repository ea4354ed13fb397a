// The experts' expand inside the base GEMM, on Hopper (sm_90a), as a standalone measurement:
//
//   out = x W0^T + H B_all^T        x (T, d_in), W0 (d_out, d_in), H (T, N r), B_all (d_out, N r)
//
// one CUTLASS warp-specialized TMA GEMM whose producer warp loads the k-tiles of (x, W0) and then
// those of (H, B_all) from a second pair of TMA descriptors into the same shared-memory pipeline: one
// accumulator, one epilogue, no copy of x beside H and no second pass over out. Against, in the same
// run: cuBLAS's base GEMM alone, today's prefill form (the base GEMM, then out += H B_all^T with
// beta = 1), CUTLASS's plain base GEMM (the same kernel without the second segment), and an fp32
// reference of [x | H] [W0 | B_all]^T (cuBLAS on concatenated copies) for the error of both forms.
// A sweep of tile shapes, clusters, cooperative / ping-pong kernels and swizzles (`Configs`,
// `kSwizzles`); the table shows the fastest plain and fused configuration per shape, -v every one.
//
//   nvcc -std=c++17 -O3 -DNDEBUG -arch=sm_90a --expt-relaxed-constexpr -I$CUTLASS/include \
//        -I$CUTLASS/tools/util/include fused_expand.cu -lcublas -o fused_expand
//   ./fused_expand [-v] [T ...]     (default 1024 4096; scripts/gpu_fused_expand.sh builds and runs it)
//
// Not part of the library: it decides whether the fusion is worth building into meteora.linear.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

// A failed CUDA / cuBLAS call: where, what, and the library's word for it; then exit.
[[noreturn]] void fail(const char* file, int line, const char* call, const char* why) {
  std::fprintf(stderr, "%s:%d: %s: %s\n", file, line, call, why);
  std::exit(1);
}
#define CHECK_CUDA(x)                                                         \
  do {                                                                        \
    const cudaError_t e_ = (x);                                               \
    if (e_ != cudaSuccess) fail(__FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
  } while (0)
#define CHECK_CUBLAS(x)                                                                          \
  do {                                                                                           \
    const cublasStatus_t s_ = (x);                                                               \
    if (s_ != CUBLAS_STATUS_SUCCESS) fail(__FILE__, __LINE__, #x, cublasGetStatusString(s_));    \
  } while (0)

using Element = cutlass::bfloat16_t;
using Accumulator = float;
using LayoutA = cutlass::layout::RowMajor;     // x, H: (T, K) rows
using LayoutB = cutlass::layout::ColumnMajor;  // W0, B_all: (d_out, K) rows, i.e. K-major B
using LayoutD = cutlass::layout::RowMajor;     // out (T, d_out)
constexpr int kAlign = 8;                      // 16 bytes of bf16
#include "../../csrc/sm90/two_segment_mainloop.h"

using meteora::sm90::TwoSegmentMainloop;

using ProblemShape = Shape<int, int, int, int>;

// One tile configuration: CUTLASS's plain GEMM and the two-segment one, with the cooperative kernel
// (two consumer warpgroups share each tile) or the ping-pong one (each warpgroup its own tile).
template <class Tile, class Cluster, bool kPingpong = false>
struct Config {
  using EpilogueSchedule = std::conditional_t<kPingpong, cutlass::epilogue::TmaWarpSpecialized,
                                              cutlass::epilogue::TmaWarpSpecializedCooperative>;
  using KernelSchedule = std::conditional_t<kPingpong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                            cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster, cutlass::epilogue::collective::EpilogueTileAuto,
      Accumulator, Accumulator, void, LayoutD, kAlign, Element, LayoutD, kAlign, EpilogueSchedule>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign,
      Accumulator, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Fused = cutlass::gemm::device::GemmUniversalAdapter<
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, TwoSegmentMainloop<Mainloop>, Epilogue>>;
  using Plain = cutlass::gemm::device::GemmUniversalAdapter<
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>>;
  using StrideA = typename Mainloop::StrideA;
  using StrideB = typename Mainloop::StrideB;
  using StrideD = typename Epilogue::StrideD;
  static constexpr int kTileM = size<0>(Tile{}), kTileN = size<1>(Tile{});
  static constexpr int kClusterM = size<0>(Cluster{}), kClusterN = size<1>(Cluster{});
  static constexpr bool kPingpongSchedule = kPingpong;
};
// The configurations swept (each with every swizzle of kSwizzles): cuBLAS's Hopper kernels beat
// CUTLASS's first two by up to 18% on the plain base GEMM (2026-12-02, results/h200_fused_expand).
using Configs = std::tuple<Config<Shape<_128, _256, _64>, Shape<_1, _2, _1>>, Config<Shape<_128, _256, _64>, Shape<_2, _1, _1>>,
                           Config<Shape<_256, _128, _64>, Shape<_2, _1, _1>>, Config<Shape<_256, _128, _64>, Shape<_1, _2, _1>>,
                           Config<Shape<_128, _128, _64>, Shape<_2, _1, _1>>,
                           Config<Shape<_128, _128, _64>, Shape<_1, _2, _1>, true>,
                           Config<Shape<_64, _256, _64>, Shape<_1, _2, _1>, true>>;
constexpr int kSwizzles[] = {1, 2, 4, 8};

__global__ void fill(__nv_bfloat16* p, size_t n, unsigned seed, float scale, int zero_every) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = unsigned(i) * 2654435761u ^ seed * 2246822519u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    float v = (float(h & 0xffffff) / float(0xffffff) - 0.5f) * 2.f * scale;
    // H: a token keeps k r = 16 of N r = 224 values, as route_select leaves it (top-2 of 28, r = 8)
    if (zero_every > 0 && ((i / 8) % zero_every) != ((i / 224) % zero_every)) v = 0.f;
    p[i] = __float2bfloat16(v);
  }
}

// dst rows [a | b]: a (rows, ca), b (rows, cb), bf16, dst (rows, ca + cb)
__global__ void concat(__nv_bfloat16* dst, const __nv_bfloat16* a, const __nv_bfloat16* b, size_t rows, int ca, int cb) {
  const size_t n = rows * size_t(ca + cb);
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / (ca + cb);
    const int c = int(i % (ca + cb));
    dst[i] = c < ca ? a[r * ca + c] : b[r * cb + (c - ca)];
  }
}

__global__ void max_err(const __nv_bfloat16* out, const float* ref, size_t n, float* result) {
  float m = 0.f;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    m = fmaxf(m, fabsf(__bfloat162float(out[i]) - ref[i]));
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (threadIdx.x % 32 == 0) atomicMax(reinterpret_cast<int*>(result), __float_as_int(m));  // m >= 0
}

template <class Fn>
float time_us(Fn&& fn, int iters = 20, int repeats = 7) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) fn();
  std::vector<float> t;
  for (int r = 0; r < repeats; ++r) {
    CHECK_CUDA(cudaEventRecord(a));
    for (int i = 0; i < iters; ++i) fn();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1000.f / iters);
  }
  std::sort(t.begin(), t.end());
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  return t[t.size() / 2];
}

struct Measured {
  bool ok = false;
  float plain_us = 0.f, fused_us = 0.f;
};

// CUTLASS's plain GEMM (x W0^T into out_plain) and the two-segment one (into out_fused) with config C.
template <class C>
Measured run_cutlass(int T, int N, int K1, int nr, const __nv_bfloat16* x, const __nv_bfloat16* w0,
                     const __nv_bfloat16* h, const __nv_bfloat16* b, __nv_bfloat16* out_plain,
                     __nv_bfloat16* out_fused, const cutlass::KernelHardwareInfo& hw, int swizzle) {
  using StrideA = typename C::StrideA;
  using StrideB = typename C::StrideB;
  using StrideD = typename C::StrideD;
  const int K = TwoSegmentMainloop<typename C::Mainloop>::padded(K1) + nr;
  typename C::Fused fused;
  typename C::Fused::Arguments fargs{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {T, N, K, 1},
      {reinterpret_cast<Element const*>(x), cutlass::make_cute_packed_stride(StrideA{}, make_shape(T, K1, 1)),
       reinterpret_cast<Element const*>(w0), cutlass::make_cute_packed_stride(StrideB{}, make_shape(N, K1, 1)),
       reinterpret_cast<Element const*>(h), cutlass::make_cute_packed_stride(StrideA{}, make_shape(T, nr, 1)),
       reinterpret_cast<Element const*>(b), cutlass::make_cute_packed_stride(StrideB{}, make_shape(N, nr, 1)), K1},
      {{1.f, 0.f}, nullptr, StrideD{}, reinterpret_cast<Element*>(out_fused),
       cutlass::make_cute_packed_stride(StrideD{}, make_shape(T, N, 1))},
      hw,
      {swizzle}};
  typename C::Plain plain;
  typename C::Plain::Arguments pargs{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {T, N, K1, 1},
      {reinterpret_cast<Element const*>(x), cutlass::make_cute_packed_stride(StrideA{}, make_shape(T, K1, 1)),
       reinterpret_cast<Element const*>(w0), cutlass::make_cute_packed_stride(StrideB{}, make_shape(N, K1, 1))},
      {{1.f, 0.f}, nullptr, StrideD{}, reinterpret_cast<Element*>(out_plain),
       cutlass::make_cute_packed_stride(StrideD{}, make_shape(T, N, 1))},
      hw,
      {swizzle}};
  Measured m;
  void *fws = nullptr, *pws = nullptr;
  CHECK_CUDA(cudaMalloc(&fws, std::max<size_t>(C::Fused::get_workspace_size(fargs), 16)));
  CHECK_CUDA(cudaMalloc(&pws, std::max<size_t>(C::Plain::get_workspace_size(pargs), 16)));
  if (fused.can_implement(fargs) == cutlass::Status::kSuccess && fused.initialize(fargs, fws) == cutlass::Status::kSuccess &&
      plain.can_implement(pargs) == cutlass::Status::kSuccess && plain.initialize(pargs, pws) == cutlass::Status::kSuccess) {
    auto check = [](cutlass::Status st) {
      if (st != cutlass::Status::kSuccess) {
        std::fprintf(stderr, "CUTLASS run failed: %s\n", cutlassGetStatusString(st));
        std::exit(1);
      }
    };
    m.plain_us = time_us([&] { check(plain.run()); });
    m.fused_us = time_us([&] { check(fused.run()); });
    CHECK_CUDA(cudaDeviceSynchronize());
    m.ok = true;
  }
  CHECK_CUDA(cudaFree(fws));
  CHECK_CUDA(cudaFree(pws));
  return m;
}

struct Best {
  float us = 1e30f;
  char name[64] = "-";
  void offer(float t, const char* n) {
    if (t < us) {
      us = t;
      std::snprintf(name, sizeof(name), "%s", n);
    }
  }
};

template <class T>
struct Tag {
  using type = T;
};
template <class Fn, class... Cs>
void for_each_config_in(Fn&& fn, std::tuple<Cs...>*) {
  (fn(Tag<Cs>{}), ...);
}
template <class Fn>
void for_each_config(Fn&& fn) {
  for_each_config_in(fn, static_cast<Configs*>(nullptr));
}

int main(int argc, char** argv) {
  std::vector<int> tokens_list;
  bool verbose = false;  // -v: a line per configuration and swizzle
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "-v") verbose = true;
    else tokens_list.push_back(std::atoi(argv[i]));
  }
  if (tokens_list.empty()) tokens_list = {1024, 4096};
  struct Shape_ {
    const char* name;
    int d_in, d_out;
  };
  // LLaMA-3-8B's linears, and one whose d_in is not a multiple of the tile's K (a partial k-tile in
  // each segment)
  const Shape_ shapes[] = {{"q/o", 4096, 4096}, {"k/v", 4096, 1024}, {"gate/up", 4096, 14336}, {"down", 14336, 4096},
                           {"odd", 1000, 1032}};
  const int nr = 28 * 8;
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs; N r = %d; times in us (median of 7 x 20 calls)\n", prop.name, prop.multiProcessorCount, nr);
  std::printf("%-8s %5s | %7s %7s %7s %6s | %7s %-22s %7s %-22s %6s %6s | %7s %7s\n", "linear", "T", "cuBLAS",
              "again", "+expand", "ratio", "plain", "(best CUTLASS)", "fused", "(best CUTLASS)", "plain", "fused",
              "err cur", "err fus");
  std::printf("(cuBLAS: the base GEMM before and after the sweep, then base + the beta-1 expand GEMM; plain / fused: the\n"
              " fastest CUTLASS configuration of the sweep (tile, cluster, cooperative / ping-pong, swizzle); ratios over\n"
              " cuBLAS's first base time; errors: max |out - fp32 reference|, the fused one over every configuration)\n");
  cublasHandle_t blas;
  CHECK_CUBLAS(cublasCreate(&blas));
  cutlass::KernelHardwareInfo hw;
  hw.device_id = 0;
  hw.sm_count = prop.multiProcessorCount;
  int failures = 0;
  for (int T : tokens_list) {
    for (const auto& s : shapes) {
      const int K1 = s.d_in, N = s.d_out, K = K1 + nr;  // the reference's K
      __nv_bfloat16 *x, *w0, *h, *b, *out_cur, *out_fused, *out_plain, *xcat, *wcat;
      float *ref, *err;
      CHECK_CUDA(cudaMalloc(&x, size_t(T) * K1 * 2));
      CHECK_CUDA(cudaMalloc(&w0, size_t(N) * K1 * 2));
      CHECK_CUDA(cudaMalloc(&h, size_t(T) * nr * 2));
      CHECK_CUDA(cudaMalloc(&b, size_t(N) * nr * 2));
      CHECK_CUDA(cudaMalloc(&out_cur, size_t(T) * N * 2));
      CHECK_CUDA(cudaMalloc(&out_fused, size_t(T) * N * 2));
      CHECK_CUDA(cudaMalloc(&out_plain, size_t(T) * N * 2));
      CHECK_CUDA(cudaMalloc(&xcat, size_t(T) * K * 2));
      CHECK_CUDA(cudaMalloc(&wcat, size_t(N) * K * 2));
      CHECK_CUDA(cudaMalloc(&ref, size_t(T) * N * 4));
      CHECK_CUDA(cudaMalloc(&err, 2 * sizeof(float)));
      fill<<<1024, 256>>>(x, size_t(T) * K1, 1, 1.f, 0);
      fill<<<1024, 256>>>(w0, size_t(N) * K1, 2, 1.f / 64, 0);
      fill<<<1024, 256>>>(h, size_t(T) * nr, 3, 1.f, 14);
      fill<<<1024, 256>>>(b, size_t(N) * nr, 4, 0.3f, 0);
      concat<<<1024, 256>>>(xcat, x, h, T, K1, nr);
      concat<<<1024, 256>>>(wcat, w0, b, N, K1, nr);
      CHECK_CUDA(cudaGetLastError());
      const float one = 1.f, zero = 0.f;
      // column-major view: out^T (N x T) = W^T (K x N)^T x^T (K x T)
      auto base = [&] {
        CHECK_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K1, &one, w0, CUDA_R_16BF, K1, x, CUDA_R_16BF, K1,
                                  &zero, out_cur, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      };
      auto current = [&] {
        base();
        CHECK_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, N, T, nr, &one, b, CUDA_R_16BF, nr, h, CUDA_R_16BF, nr,
                                  &one, out_cur, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      };
      CHECK_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, wcat, CUDA_R_16BF, K, xcat, CUDA_R_16BF, K,
                                &zero, ref, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));

      const float t_base = time_us(base), t_cur = time_us(current);
      // each configuration writes its own output; the error is checked for both
      current();
      CHECK_CUDA(cudaMemset(err, 0, sizeof(float)));
      max_err<<<1024, 256>>>(out_cur, ref, size_t(T) * N, err);
      float e_cur = 0.f;
      CHECK_CUDA(cudaMemcpy(&e_cur, err, sizeof(float), cudaMemcpyDeviceToHost));
      // every configuration and swizzle: the plain and the fused GEMM, the fused one's error checked
      Best best_plain, best_fused;
      float e_fused = 0.f;
      int ran = 0;
      for_each_config([&](auto tag) {
        using C = typename decltype(tag)::type;
        for (int sw : kSwizzles) {
          const Measured m = run_cutlass<C>(T, N, K1, nr, x, w0, h, b, out_plain, out_fused, hw, sw);
          if (!m.ok) continue;
          ++ran;
          CHECK_CUDA(cudaMemset(err, 0, sizeof(float)));
          max_err<<<1024, 256>>>(out_fused, ref, size_t(T) * N, err);
          float e = 0.f;
          CHECK_CUDA(cudaMemcpy(&e, err, sizeof(float), cudaMemcpyDeviceToHost));
          e_fused = std::max(e_fused, e);
          char name[64];
          std::snprintf(name, sizeof(name), "%dx%d %dx%d %s sw%d", C::kTileM, C::kTileN, C::kClusterM, C::kClusterN,
                        C::kPingpongSchedule ? "pp" : "co", sw);
          best_plain.offer(m.plain_us, name);
          best_fused.offer(m.fused_us, name);
          if (verbose) std::printf("    %-8s %5d  %-22s plain %8.1f  fused %8.1f  err %.4f\n", s.name, T, name, m.plain_us, m.fused_us, e);
        }
      });
      const float t_base2 = time_us(base);  // cuBLAS again: the clocks' drift over the sweep
      if (ran == 0) {
        std::printf("%-8s %5d | CUTLASS cannot run this shape\n", s.name, T);
        ++failures;
      } else {
        std::printf("%-8s %5d | %7.1f %7.1f %7.1f %6.3f | %7.1f %-22s %7.1f %-22s %6.3f %6.3f | %7.4f %7.4f\n", s.name, T,
                    t_base, t_base2, t_cur, t_cur / t_base, best_plain.us, best_plain.name, best_fused.us, best_fused.name,
                    best_plain.us / t_base, best_fused.us / t_base, e_cur, e_fused);
        if (!(e_fused <= 2.f * e_cur + 1e-3f)) ++failures;  // the fused form rounds once: no worse than today's
      }
      for (void* p : {(void*)x, (void*)w0, (void*)h, (void*)b, (void*)out_cur, (void*)out_fused, (void*)out_plain,
                      (void*)xcat, (void*)wcat, (void*)ref, (void*)err})
        CHECK_CUDA(cudaFree(p));
    }
  }
  CHECK_CUBLAS(cublasDestroy(blas));
  std::printf("%s\n", failures ? "FAILED (a shape could not run, or the fused error exceeds twice today's)" : "ok");
  return failures ? 1 : 0;
}
