// Philox dropout masks on CPU: the same bits as the Triton kernels (triton_kernels/dropout.py).
//
// A tensor of any shape (..., d) is read as N = numel / d rows of d elements (any strides).
// Element (i, j) belongs to the Philox group q = i * ceil(d / 4) + j / 4 (int64, a logical index:
// independent of strides) at lane c = j % 4; u_ij is uniform c of Philox call q under the seed
// (csrc/philox.h: triton.language.rand4x bit for bit), and
//
//     keep_ij = u_ij >= float(p);   x_d = keep ? x * float(1 / (1 - p)) : 0
//
// Arithmetic in float32 for float32/float16/bfloat16 tensors (float64 in float64; the mask bits
// are the same), stores in the tensor's dtype.  The extension is built with -ffp-contract=off so
// that no product is fused into an add the Triton kernels round separately (fastadapt/_cpp.py).
//
// Work split: tiles of (row, kTileCols columns), at::parallel_for over tiles.  Per tile, the
// uniforms of all its Philox calls (AVX-512 or AVX2 where the CPU has it, picked once at load
// time; portable C++ otherwise), then one pass that applies the mask (unit-stride loops the
// compiler vectorises; any other strides take the same loop with a stride).
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with the at::Tensor caster (torch/python.h costs 4x the compile time)

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "philox.h"

namespace fastadapt_philox {
#if FASTADAPT_X86_SIMD
void philox_uniforms_avx512(int64_t q0, int64_t n_groups, const RoundKeys& keys, float* u);  // philox_avx512.cpp
void philox_uniforms_avx2(int64_t q0, int64_t n_groups, const RoundKeys& keys, float* u);    // philox_avx2.cpp
#endif
}  // namespace fastadapt_philox

namespace {

using fastadapt_philox::RoundKeys;
using fastadapt_philox::UniformsFn;

constexpr int64_t kTileCols = 1024;        // columns per tile: a multiple of 4 * kGroupsRoundUp
constexpr int64_t kGrainElements = 32768;  // elements per parallel task, at least
static_assert(kTileCols % (4 * fastadapt_philox::kGroupsRoundUp) == 0, "tile buffer holds rounded-up groups");
// A compile-time stride of 1: the apply loops instantiated with it are unit-stride loops the compiler
// vectorises; any other stride takes the same loop with a runtime stride.
constexpr std::integral_constant<int64_t, 1> kUnitStride{};

// The Philox implementations this CPU runs, best first ("scalar" always last).
std::vector<std::pair<std::string, UniformsFn>> available_uniforms() {
  std::vector<std::pair<std::string, UniformsFn>> found;
#if FASTADAPT_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) found.emplace_back("avx512", fastadapt_philox::philox_uniforms_avx512);
  if (__builtin_cpu_supports("avx2")) found.emplace_back("avx2", fastadapt_philox::philox_uniforms_avx2);
#endif
  found.emplace_back("scalar", fastadapt_philox::philox_uniforms_scalar);
  return found;
}

const UniformsFn kBestUniforms = available_uniforms().front().second;

std::vector<std::string> philox_isas() {
  std::vector<std::string> names;
  for (const auto& entry : available_uniforms()) names.push_back(entry.first);
  return names;
}

UniformsFn uniforms_named(const std::string& isa) {
  for (const auto& [name, fn] : available_uniforms())
    if (name == isa) return fn;
  TORCH_CHECK_VALUE(false, "isa=", isa, " is not available on this CPU; valid choices: ", philox_isas());
}

// Row i of a tensor viewed as (N, d): the element offset of (i, 0).  Leading dims that collapse
// to one stride (any contiguous or row-sliced tensor) take one multiply; others a divmod chain.
struct RowOffsets {
  std::vector<int64_t> sizes, strides;  // leading dims, innermost first
  int64_t collapsed_stride = 0;
  bool collapsed = true;

  explicit RowOffsets(const at::Tensor& t) {
    for (int64_t k = t.dim() - 2; k >= 0; --k) {
      if (t.size(k) == 1) continue;  // a size-1 dim never moves the offset
      sizes.push_back(t.size(k));
      strides.push_back(t.stride(k));
    }
    if (sizes.empty()) return;
    collapsed_stride = strides[0];
    int64_t expected = strides[0];
    for (size_t k = 1; k < sizes.size(); ++k) {
      expected *= sizes[k - 1];
      collapsed = collapsed && strides[k] == expected;
    }
  }

  int64_t operator()(int64_t i) const {
    if (collapsed) return i * collapsed_stride;
    int64_t offset = 0;
    for (size_t k = 0; k < sizes.size(); ++k) {
      offset += (i % sizes[k]) * strides[k];
      i /= sizes[k];
    }
    return offset;
  }
};

struct Mask {
  UniformsFn uniforms;
  RoundKeys keys;
  float p;       // the Triton kernels compare a float32 uniform with float32 p
  double scale;  // 1 / (1 - p) in double; rounded to the compute type where used
  int64_t d, groups_per_row, tiles_per_row;

  Mask(int64_t seed, double p_, int64_t d_, UniformsFn uniforms_ = kBestUniforms)
      : uniforms(uniforms_),
        keys(fastadapt_philox::round_keys(static_cast<uint64_t>(seed))),
        p(static_cast<float>(p_)),
        scale(1.0 / (1.0 - p_)),
        d(d_),
        groups_per_row((d_ + 3) / 4),
        tiles_per_row((d_ + kTileCols - 1) / kTileCols) {}

  // Calls f(i, j0, n, u): row i, columns j0 .. j0 + n, u[j - j0] the uniform of column j; in parallel
  // over (row, column tile) pairs.  Rows count from first_row (0: a whole tensor).
  template <typename F>
  void for_each_tile(int64_t rows, const F& f, int64_t first_row = 0) const {
    const int64_t tiles = rows * tiles_per_row;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::min(d, kTileCols));
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      alignas(64) float u[kTileCols];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t / tiles_per_row, j0 = (t % tiles_per_row) * kTileCols;
        const int64_t n = std::min(kTileCols, d - j0);
        uniforms((first_row + i) * groups_per_row + j0 / 4, (n + 3) / 4, keys, u);
        f(i, j0, n, u);
      }
    });
  }
};

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

void check_args(const char* name, const at::Tensor& t, int64_t seed, double p) {
  TORCH_CHECK_TYPE(t.device().is_cpu(), name, " is on ", t.device(), "; the csrc dropout ops take CPU tensors");
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                   name, " has dtype ", dtype, "; the dropout ops take float32, float16, bfloat16 or float64");
  TORCH_CHECK_VALUE(t.dim() >= 1, name, " is 0-dimensional; the dropout ops take (..., d) tensors");
  TORCH_CHECK_VALUE(p > 0.0 && p < 1.0, "p=", p, " must be in (0, 1), e.g. p=0.1");
  TORCH_CHECK_VALUE(seed >= 0, "seed=", seed, " must be in [0, 2**63)");
}

// The per-tile loops: n elements of one row, u[j] the uniform of element j; scalars by value and
// __restrict pointers so that the compiler keeps them in registers and vectorises (Stride is
// kUnitStride or a runtime int64_t).  keep ? x * scale : 0 is the Triton kernels' tl.where; the
// extension is built with -fno-trapping-math so that the compiler may compute the product on
// dropped elements too and select (a vector blend) instead of branching per element (4x faster).
template <typename T, typename Acc, typename Stride>
void drop_tile(const T* __restrict x, Stride stride, const float* __restrict u, float p, Acc scale, int64_t n,
               T* __restrict x_d) {
  for (int64_t j = 0; j < n; ++j) {
    const Acc v_scaled = static_cast<Acc>(x[j * stride]) * scale;
    x_d[j] = static_cast<T>(u[j] >= p ? v_scaled : Acc(0));
  }
}

template <typename T, typename Acc, typename Stride>
void drop_tile_with_rest(const T* __restrict x, Stride stride, const float* __restrict u, float p, Acc scale,
                         int64_t n, T* __restrict x_d, T* __restrict rest) {
  for (int64_t j = 0; j < n; ++j) {
    const Acc v = static_cast<Acc>(x[j * stride]), v_scaled = v * scale;
    const Acc v_d = u[j] >= p ? v_scaled : Acc(0);
    x_d[j] = static_cast<T>(v_d);
    rest[j] = static_cast<T>(v - v_d);
  }
}

template <typename T, typename In, typename Acc, typename OutStride, typename InStride>
void mask_add_tile(T* __restrict out, OutStride out_stride, const In* __restrict inner, InStride in_stride,
                   const float* __restrict u, float p, Acc scale, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const Acc v_scaled = static_cast<Acc>(inner[j * in_stride]) * scale;
    const Acc add = u[j] >= p ? v_scaled : Acc(0);
    out[j * out_stride] = static_cast<T>(static_cast<Acc>(out[j * out_stride]) + add);
  }
}

// x_d = mask o x (and x - x_d), contiguous, in x's dtype.
std::vector<at::Tensor> seeded_dropout(const at::Tensor& x, int64_t seed, double p, bool with_rest) {
  check_args("x", x, seed, p);
  at::Tensor x_d = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor rest = with_rest ? at::empty_like(x_d) : at::Tensor();
  const int64_t d = x.size(-1);
  if (x.numel() == 0) return with_rest ? std::vector<at::Tensor>{x_d, rest} : std::vector<at::Tensor>{x_d};
  const int64_t rows = x.numel() / d, col_stride = x.stride(-1);
  const RowOffsets row_offset(x);
  const Mask mask(seed, p, d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "seeded_dropout", [&] {
    using acc_t = compute_t<scalar_t>;
    const acc_t scale = static_cast<acc_t>(mask.scale);
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* xd_ptr = x_d.mutable_data_ptr<scalar_t>();
    scalar_t* rest_ptr = with_rest ? rest.mutable_data_ptr<scalar_t>() : nullptr;
    mask.for_each_tile(rows, [&](int64_t i, int64_t j0, int64_t n, const float* u) {
      const scalar_t* src = x_ptr + row_offset(i) + j0 * col_stride;
      const int64_t at = i * d + j0;
      auto apply = [&](auto stride) {
        if (rest_ptr == nullptr) drop_tile(src, stride, u, mask.p, scale, n, xd_ptr + at);
        else drop_tile_with_rest(src, stride, u, mask.p, scale, n, xd_ptr + at, rest_ptr + at);
      };
      if (col_stride == 1) apply(kUnitStride); else apply(col_stride);
    });
  });
  return with_rest ? std::vector<at::Tensor>{x_d, rest} : std::vector<at::Tensor>{x_d};
}

// out += mask o inner in place; inner in out's dtype or in the compute type (float32 inner term on
// a half out), any strides; out must not overlap itself or inner.
void dropout_mask_add_(at::Tensor& out, const at::Tensor& inner, int64_t seed, double p) {
  check_args("out", out, seed, p);
  check_args("inner", inner, seed, p);
  TORCH_CHECK_VALUE(inner.sizes() == out.sizes(), "inner has shape ", inner.sizes(), " but out has shape ",
                    out.sizes(), "; they must match");
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes,
                    "out has overlapping elements (e.g. an expanded view); pass a tensor that owns its elements");
  at::assert_no_partial_overlap(out, inner);
  if (out.numel() == 0) return;
  const int64_t d = out.size(-1), rows = out.numel() / d;
  const at::ScalarType acc = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor in = inner.scalar_type() == out.scalar_type() ? inner : inner.to(acc);
  const RowOffsets out_row(out), in_row(in);
  const int64_t out_cs = out.stride(-1), in_cs = in.stride(-1);
  const Mask mask(seed, p, d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dropout_mask_add_", [&] {
    using acc_t = compute_t<scalar_t>;
    const acc_t scale = static_cast<acc_t>(mask.scale);
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    auto run = [&](const auto* in_ptr) {
      mask.for_each_tile(rows, [&](int64_t i, int64_t j0, int64_t n, const float* u) {
        scalar_t* o = out_ptr + out_row(i) + j0 * out_cs;
        const auto* v = in_ptr + in_row(i) + j0 * in_cs;
        if (out_cs == 1 && in_cs == 1) mask_add_tile(o, kUnitStride, v, kUnitStride, u, mask.p, scale, n);
        else mask_add_tile(o, out_cs, v, in_cs, u, mask.p, scale, n);
      });
    };
    if (in.scalar_type() == out.scalar_type()) run(in.const_data_ptr<scalar_t>());
    else run(in.const_data_ptr<acc_t>());
  });
}

// The uniforms u_ij themselves for rows first_row .. first_row + rows of a (.., d) tensor, (rows, d)
// float32, from the implementation ``isa`` (one of philox_isas()): the tests compare every
// implementation this CPU has with the torch Philox, also past Philox call 2^32.
at::Tensor philox_uniform(int64_t rows, int64_t d, int64_t seed, const std::string& isa, int64_t first_row) {
  TORCH_CHECK_VALUE(rows >= 0 && d >= 1 && first_row >= 0, "rows=", rows, ", d=", d, ", first_row=", first_row,
                    ": need rows >= 0, d >= 1, first_row >= 0");
  TORCH_CHECK_VALUE(seed >= 0, "seed=", seed, " must be in [0, 2**63)");
  at::Tensor u = at::empty({rows, d}, at::TensorOptions().dtype(at::kFloat));
  const Mask mask(seed, 0.5, d, uniforms_named(isa));
  float* u_ptr = u.mutable_data_ptr<float>();
  mask.for_each_tile(rows, [&](int64_t i, int64_t j0, int64_t n, const float* tile) {
    std::copy(tile, tile + n, u_ptr + i * d + j0);
  }, first_row);
  return u;
}

}  // namespace

// The kernels run without the GIL (other Python threads keep running while a mask is made).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using no_gil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.doc() = "fastadapt C++ CPU kernels (csrc/)";
  m.def("seeded_dropout", &seeded_dropout, "[x_d] or [x_d, x - x_d] for the Philox mask of (seed, p)", no_gil(),
        pybind11::arg("x"), pybind11::arg("seed"), pybind11::arg("p"), pybind11::arg("with_rest"));
  m.def("dropout_mask_add_", &dropout_mask_add_, "out += mask o inner in place", no_gil(), pybind11::arg("out"),
        pybind11::arg("inner"), pybind11::arg("seed"), pybind11::arg("p"));
  m.def("philox_uniform", &philox_uniform, "(rows, d) float32 uniforms of the Philox stream",
        pybind11::arg("rows"), pybind11::arg("d"), pybind11::arg("seed"), pybind11::arg("isa"),
        pybind11::arg("first_row") = 0);
  m.def("philox_isas", &philox_isas, "the Philox implementations this CPU runs, best first");
}
