// The fused prefill expand (csrc/cuda/fused_expand.h) on Hopper: CUTLASS's sm90 cooperative
// warp-specialized TMA GEMM with TwoSegmentMainloop, whose producer warp loads the (x, W0) k-tiles
// and then the (H, B_all) k-tiles into one pipeline. Compiled for sm_90a only, in a target of its
// own (CMakeLists.txt), so that the rest of the extension keeps its architectures.
//
// Two tile shapes: 128 x 256 with a 2 x 1 cluster for the large GEMMs, 256 x 128 with 1 x 2 where
// d_out is small against T or d_in (H200 sweep, benchmarks/results/h200_fused_expand).
#include "cuda/fused_expand.h"

#include <limits>

#include "cuda/grouped.h"  // aligned16

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "sm90/two_segment_mainloop.h"

namespace meteora::cuda {
namespace {

using namespace cute;
using sm90::TwoSegmentMainloop;

constexpr int kAlign = 8;  // elements in 16 bytes of fp16 / bf16: TMA's alignment

template <class Element, class Tile, class Cluster>
struct Gemm {
  using LayoutA = cutlass::layout::RowMajor;     // x, H: (T, K) rows
  using LayoutB = cutlass::layout::ColumnMajor;  // W0, B_all: (d_out, K) rows
  using LayoutD = cutlass::layout::RowMajor;     // out (T, d_out)
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster, cutlass::epilogue::collective::EpilogueTileAuto,
      float, float, void, LayoutD, kAlign, Element, LayoutD, kAlign,
      cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, float,
      Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Fused = TwoSegmentMainloop<Mainloop>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Fused, Epilogue>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Device::Arguments arguments(const FusedExpandArgs& a) {
    using StrideA = typename Mainloop::StrideA;
    using StrideB = typename Mainloop::StrideB;
    using StrideD = typename Epilogue::StrideD;
    const int T = int(a.tokens), N = int(a.d_out), K1 = int(a.d_in), K2 = int(a.nr);
    // packed strides, then each operand's own leading dimension
    StrideA sx = cutlass::make_cute_packed_stride(StrideA{}, make_shape(T, K1, 1));
    StrideA sh = cutlass::make_cute_packed_stride(StrideA{}, make_shape(T, K2, 1));
    StrideB sw = cutlass::make_cute_packed_stride(StrideB{}, make_shape(N, K1, 1));
    StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, make_shape(N, K2, 1));
    StrideD so = cutlass::make_cute_packed_stride(StrideD{}, make_shape(T, N, 1));
    get<0>(sx) = a.ldx;
    get<0>(sh) = a.ldh;
    get<0>(sw) = a.ldw;
    get<0>(sb) = a.ldb;
    get<0>(so) = a.ldo;
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;  // only read when sm_count is 0
    hw.sm_count = a.sm_count;
    return typename Device::Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {T, N, Fused::padded(K1) + K2, 1},
        {static_cast<const Element*>(a.x), sx, static_cast<const Element*>(a.w0), sw,
         static_cast<const Element*>(a.h), sh, static_cast<const Element*>(a.b), sb, K1},
        {{1.f, 0.f}, nullptr, StrideD{}, static_cast<Element*>(a.out), so},
        hw};
  }
  static bool supported(const FusedExpandArgs& a) {
    return Device::can_implement(arguments(a)) == cutlass::Status::kSuccess;
  }
  static size_t workspace(const FusedExpandArgs& a) { return Device::get_workspace_size(arguments(a)); }
  static bool run(const FusedExpandArgs& a, void* workspace, cudaStream_t stream) {
    Device gemm;
    return gemm(arguments(a), workspace, stream) == cutlass::Status::kSuccess;
  }
};

template <class Element>
using Wide = Gemm<Element, Shape<_128, _256, _64>, Shape<_2, _1, _1>>;
template <class Element>
using Tall = Gemm<Element, Shape<_256, _128, _64>, Shape<_1, _2, _1>>;

// The sweep's better tile per shape: 256 x 128 for down_proj-like (d_in > d_out) and for q / o at
// T <= 1024, 128 x 256 otherwise.
bool tall(const FusedExpandArgs& a) { return a.d_in > a.d_out || (a.tokens <= 1024 && a.d_out <= 4096); }

template <template <class> class G, class Fn>
auto dispatch(const FusedExpandArgs& a, Fn&& fn) {
  return a.half ? fn(G<cutlass::half_t>{}) : fn(G<cutlass::bfloat16_t>{});
}
template <class Fn>
auto dispatch(const FusedExpandArgs& a, Fn&& fn) {
  return tall(a) ? dispatch<Tall>(a, fn) : dispatch<Wide>(a, fn);
}

}  // namespace

bool fused_expand_supported(const FusedExpandArgs& a) {
  const int64_t limit = std::numeric_limits<int>::max() / 2;
  for (int64_t v : {a.tokens, a.d_out, a.d_in, a.nr, a.ldx, a.ldw, a.ldh, a.ldb, a.ldo}) {
    if (v <= 0 || v > limit) return false;
  }
  for (int64_t v : {a.d_in, a.nr, a.d_out, a.ldx, a.ldw, a.ldh, a.ldb, a.ldo}) {
    if (v % kAlign != 0) return false;
  }
  if (!aligned16(a.x) || !aligned16(a.w0) || !aligned16(a.h) || !aligned16(a.b) || !aligned16(a.out)) return false;
  if (a.ldx < a.d_in || a.ldw < a.d_in || a.ldh < a.nr || a.ldb < a.nr || a.ldo < a.d_out) return false;
  return dispatch(a, [&](auto g) { return decltype(g)::supported(a); });
}

size_t fused_expand_workspace(const FusedExpandArgs& a) {
  return dispatch(a, [&](auto g) { return decltype(g)::workspace(a); });
}

bool fused_expand(const FusedExpandArgs& a, void* workspace, cudaStream_t stream) {
  return dispatch(a, [&](auto g) { return decltype(g)::run(a, workspace, stream); });
}

}  // namespace meteora::cuda
