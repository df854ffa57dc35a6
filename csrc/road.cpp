// RoAd's pair rotation on CPU: the forward pass and the backward's df / dg (and dh) pass, one
// at::parallel_for each, every element read once.
//
//     y_a  = f_a h_a - g_a h_b,        y_b  = f_b h_b + g_b h_a        (pairs a, b = a + group / 2)
//     dh_a = f_a dy_a + g_b dy_b,      dh_b = f_b dy_b - g_a dy_a
//     df   = sum_rows dy o h,          dg_a = -sum_rows dy_a h_b,      dg_b = sum_rows dy_b h_a
//
// h, dy (N, out) in float32 / float64 / float16 / bfloat16, any row stride (a column stride other
// than 1 is made contiguous first); f, g (out,) in the accumulation type (float64 for float64,
// float32 otherwise); y and dh in h's type, df and dg in the accumulation type.
//
// Bits: the torch path's (fastadapt.ops.butterfly: _road_torch, _road_backward_torch), whose ops
// round as follows.  y_a = fma(-g_a, h_b, round(f_a h_a)) and the same shape for y_b and dh: one
// rounding of the product f h, then a multiply-add, rounded once to the accumulation type and once
// more to h's type.  df / dg: per-row partial sums p[r] (r = row mod S, S = step_rows: the torch path's
// step, 128) that add the rows' products in row order, p[r] = fma(dy, h, p[r]) from zero, then
// at::sum over the (min(N, S), out) partials -- the torch path's own reduction.  Whether "fma" is
// fused depends on how ATen's CPU kernels were built: its AVX2 and AVX512 kernels contract
// ``self + value * t1 * t2`` (addcmul) into one fused multiply-add, its DEFAULT kernels do not.  The
// extension is built with -ffp-contract=off, so the compiler fuses nothing here on its own: the
// "fma" kernels call std::fma (an instruction in the AVX2 section, compiled for AVX2 + FMA by target
// pragma and picked at run time), the "plain" kernel rounds the product before the add.  kernel=""
// picks what ATen's capability (at::get_cpu_capability: "AVX2" / "AVX512" fused, anything else
// plain) does, so the two paths agree bit for bit on x86-64 (tests check it); elsewhere (ARM, POWER:
// whether their ATen kernels fuse depends on their compiler) the plain kernel runs and agrees to
// rounding.
//
// Parallel work, and why the results do not depend on the thread count: the forward splits rows
// (elementwise).  The backward splits the residues r into blocks of kResidueBlock; one task runs a
// block's rows r, r + S, r + 2 S, ... in row order, so each partial p[r] is one sequential chain
// whatever the thread count, and the final sum is at::sum's over the partials' columns (tests compare
// 1, 2 and 3 threads bit for bit).
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTADAPT_ROAD_AVX2 1
#else
#define FASTADAPT_ROAD_AVX2 0
#endif

namespace {

constexpr int64_t kResidueBlock = 16;    // residues per backward task: 16 x out x 2 partials in L2
constexpr int64_t kGrainElements = 32768;  // at::internal::GRAIN_SIZE: less work than this runs serially

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// a * b + c, fused (one rounding) or plain (the product rounded first: -ffp-contract=off keeps it so).
struct Fused {
  template <typename A>
  static A madd(A a, A b, A c) { return std::fma(a, b, c); }
};
struct Plain {
  template <typename A>
  static A madd(A a, A b, A c) { return a * b + c; }
};

// The pairs of one group: a = [0, n), b = [n, 2 n) of its features (restrict: the compiler
// vectorises the loop without run-time overlap checks; h never overlaps y, nor dy dh).
template <typename M, typename T, typename Acc>
inline void rotate_pairs(const T* __restrict ha, const T* __restrict hb, T* __restrict ya, T* __restrict yb,
                         const Acc* __restrict fa, const Acc* __restrict fb, const Acc* __restrict ga,
                         const Acc* __restrict gb, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const Acc a = static_cast<Acc>(ha[j]), b = static_cast<Acc>(hb[j]);
    ya[j] = static_cast<T>(M::madd(-ga[j], b, fa[j] * a));
    yb[j] = static_cast<T>(M::madd(gb[j], a, fb[j] * b));
  }
}

// The backward of one group's pairs: the products added to the row's partials df, dg; dh if kDh.
template <typename M, bool kDh, typename T, typename Acc>
inline void backward_pairs(const T* __restrict dya, const T* __restrict dyb, const T* __restrict ha,
                           const T* __restrict hb, Acc* __restrict dfa, Acc* __restrict dfb, Acc* __restrict dga,
                           Acc* __restrict dgb, T* __restrict dha, T* __restrict dhb, const Acc* __restrict fa,
                           const Acc* __restrict fb, const Acc* __restrict ga, const Acc* __restrict gb, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const Acc da = static_cast<Acc>(dya[j]), db = static_cast<Acc>(dyb[j]);
    const Acc a = static_cast<Acc>(ha[j]), b = static_cast<Acc>(hb[j]);
    dfa[j] = M::madd(da, a, dfa[j]);
    dfb[j] = M::madd(db, b, dfb[j]);
    dga[j] = M::madd(-da, b, dga[j]);
    dgb[j] = M::madd(db, a, dgb[j]);
    if constexpr (kDh) {
      dha[j] = static_cast<T>(M::madd(db, gb[j], fa[j] * da));
      dhb[j] = static_cast<T>(M::madd(-da, ga[j], fb[j] * db));
    }
  }
}

template <typename M, typename T, typename Acc>
inline void rotate_row(const T* h, T* y, const Acc* f, const Acc* g, int64_t out, int64_t half) {
  for (int64_t a = 0; a < out; a += 2 * half) {
    const int64_t b = a + half;
    rotate_pairs<M>(h + a, h + b, y + a, y + b, f + a, f + b, g + a, g + b, half);
  }
}

template <typename M, bool kDh, typename T, typename Acc>
inline void backward_row(const T* dy, const T* h, const Acc* f, const Acc* g, Acc* df, Acc* dg, T* dh, int64_t out,
                         int64_t half) {
  for (int64_t a = 0; a < out; a += 2 * half) {
    const int64_t b = a + half;
    backward_pairs<M, kDh>(dy + a, dy + b, h + a, h + b, df + a, df + b, dg + a, dg + b, kDh ? dh + a : nullptr,
                           kDh ? dh + b : nullptr, f + a, f + b, g + a, g + b, half);
  }
}

// What one pass needs: pointers, strides and sizes (rows of h / dy at row strides hs / ds, y and dh
// contiguous).
template <typename T, typename Acc>
struct Pass {
  const T* h;
  int64_t hs;
  const T* dy;
  int64_t ds;
  const Acc* f;
  const Acc* g;
  T* out_rows;     // y (forward) or dh (backward; null unless wanted)
  Acc* df_rows;    // (R, out) partials
  Acc* dg_rows;
  int64_t rows, out, half, step_rows;
};

template <typename M, typename T, typename Acc>
void forward_rows(const Pass<T, Acc>& p, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) rotate_row<M>(p.h + r * p.hs, p.out_rows + r * p.out, p.f, p.g, p.out, p.half);
}

// Residues [q0, q1): rows q0 + S s .. q1 + S s for s = 0, 1, ... in that order.
template <typename M, bool kDh, typename T, typename Acc>
void backward_residues(const Pass<T, Acc>& p, int64_t q0, int64_t q1) {
  for (int64_t start = 0; start < p.rows; start += p.step_rows) {
    for (int64_t q = q0; q < q1 && start + q < p.rows; ++q) {
      const int64_t r = start + q;
      backward_row<M, kDh>(p.dy + r * p.ds, p.h + r * p.hs, p.f, p.g, p.df_rows + q * p.out, p.dg_rows + q * p.out,
                           kDh ? p.out_rows + r * p.out : nullptr, p.out, p.half);
    }
  }
}

// The kernels: Portable<M> (any CPU; std::fma is a library call where the build has no FMA) and the
// AVX2 + FMA section (std::fma inlined as an instruction, the loops vectorised by the compiler).
template <typename M>
struct Portable {
  template <typename T, typename Acc>
  static void forward(const Pass<T, Acc>& p, int64_t r0, int64_t r1) { forward_rows<M>(p, r0, r1); }
  template <bool kDh, typename T, typename Acc>
  static void backward(const Pass<T, Acc>& p, int64_t q0, int64_t q1) { backward_residues<M, kDh>(p, q0, q1); }
};

#if FASTADAPT_ROAD_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// flatten: the row loops and std::fma inlined here, compiled for AVX2 + FMA.
struct Avx2 {
  template <typename T, typename Acc>
  __attribute__((flatten)) static void forward(const Pass<T, Acc>& p, int64_t r0, int64_t r1) {
    forward_rows<Fused>(p, r0, r1);
  }
  template <bool kDh, typename T, typename Acc>
  __attribute__((flatten)) static void backward(const Pass<T, Acc>& p, int64_t q0, int64_t q1) {
    backward_residues<Fused, kDh>(p, q0, q1);
  }
};
#pragma GCC pop_options
#endif  // FASTADAPT_ROAD_AVX2

// ---- kernel choice ---------------------------------------------------------------------------------

// "avx2" (fused, AVX2 + FMA), "fma" (fused, portable), "plain" (unfused, portable), on this CPU.
std::vector<std::string> kernels() {
  std::vector<std::string> found;
#if FASTADAPT_ROAD_AVX2
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) found.emplace_back("avx2");
#endif
  found.emplace_back("fma");
  found.emplace_back("plain");
  return found;
}

// The torch path's arithmetic on the fastest kernel that has it.
const std::string& default_kernel() {
  static const std::string chosen = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability != "AVX2" && capability != "AVX512") return std::string("plain");
    return kernels().front() == "avx2" ? std::string("avx2") : std::string("fma");
  }();
  return chosen;
}

std::string pick_kernel(const std::string& kernel) {
  if (kernel.empty()) return default_kernel();
  const std::vector<std::string> available = kernels();
  TORCH_CHECK_VALUE(std::find(available.begin(), available.end(), kernel) != available.end(), "kernel=", kernel,
                    " is not available on this CPU; valid choices: ", available, " (or '' for the torch path's)");
  return kernel;
}

// Calls run(KernelType{}, T{}) for the kernel's type and h's dtype.
template <typename Run>
void dispatch(const std::string& kernel, at::ScalarType dtype, Run&& run) {
  const auto by_dtype = [&](auto k) {
    switch (dtype) {
      case at::kFloat: return run(k, float{});
      case at::kDouble: return run(k, double{});
      case at::kHalf: return run(k, c10::Half{});
      case at::kBFloat16: return run(k, c10::BFloat16{});
      default: TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype);
    }
  };
#if FASTADAPT_ROAD_AVX2
  if (kernel == "avx2") return by_dtype(Avx2{});
#endif
  if (kernel == "fma") return by_dtype(Portable<Fused>{});
  return by_dtype(Portable<Plain>{});
}

// ---- checks --------------------------------------------------------------------------------------

at::ScalarType accumulation(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// h (N, out) with a unit column stride (a contiguous copy otherwise), after checking f, g, group_size.
at::Tensor checked_rows(const char* name, const at::Tensor& h, const at::Tensor& f, const at::Tensor& g,
                        int64_t group_size) {
  TORCH_CHECK_VALUE(h.dim() == 2, name, " must be 2-D (N, out); got shape ", h.sizes());
  const at::ScalarType dtype = h.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, name,
                   " has dtype ", dtype, "; valid: float32, float64, float16, bfloat16");
  TORCH_CHECK_TYPE(h.device().is_cpu() && f.device().is_cpu() && g.device().is_cpu(), "road ops take CPU tensors");
  const int64_t out = h.size(1);
  TORCH_CHECK_VALUE(group_size > 0 && group_size % 2 == 0 && out % group_size == 0, "group_size=", group_size,
                    " must be even and divide out_features=", out);
  for (const auto& [coef, t] : {std::pair<const char*, const at::Tensor&>{"f", f}, {"g", g}}) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == out, coef, " must have shape (", out, ",); got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == accumulation(dtype), coef, " has dtype ", t.scalar_type(), "; for ", name,
                     " in ", dtype, " pass it in ", accumulation(dtype));
  }
  return h.size(1) > 1 && h.stride(1) != 1 ? h.contiguous() : h;
}

// ---- ops -----------------------------------------------------------------------------------------

at::Tensor road_rotate(const at::Tensor& h_in, const at::Tensor& f_in, const at::Tensor& g_in, int64_t group_size,
                       const std::string& kernel) {
  const at::Tensor h = checked_rows("h", h_in, f_in, g_in, group_size);
  const at::Tensor f = f_in.contiguous(), g = g_in.contiguous();
  const int64_t rows = h.size(0), out = h.size(1);
  at::Tensor y = at::empty({rows, out}, h.options());
  if (rows == 0 || out == 0) return y;
  const std::string chosen = pick_kernel(kernel);
  dispatch(chosen, h.scalar_type(), [&](auto k, auto element) {
    using T = decltype(element);
    using Acc = acc_t<T>;
    using K = decltype(k);
    const Pass<T, Acc> p{h.const_data_ptr<T>(), h.stride(0), nullptr, 0, f.const_data_ptr<Acc>(),
                         g.const_data_ptr<Acc>(), y.mutable_data_ptr<T>(), nullptr, nullptr, rows, out,
                         group_size / 2, 0};
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / out),
                     [&](int64_t r0, int64_t r1) { K::forward(p, r0, r1); });
  });
  return y;
}

// [dh (empty unless need_h), df, dg].
std::vector<at::Tensor> road_rotate_backward(const at::Tensor& grad_in, const at::Tensor& h_in, const at::Tensor& f_in,
                                             const at::Tensor& g_in, int64_t group_size, bool need_h,
                                             int64_t step_rows, const std::string& kernel) {
  const at::Tensor h = checked_rows("h", h_in, f_in, g_in, group_size);
  const at::Tensor dy = checked_rows("grad", grad_in, f_in, g_in, group_size);
  TORCH_CHECK_VALUE(dy.sizes() == h.sizes(), "grad has shape ", dy.sizes(), " but h has ", h.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == h.scalar_type(), "grad has dtype ", dy.scalar_type(), " but h has ",
                   h.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(step_rows > 0, "step_rows=", step_rows, " must be positive (the torch path's: 128)");
  const at::Tensor f = f_in.contiguous(), g = g_in.contiguous();
  const int64_t rows = h.size(0), out = h.size(1), residues = std::min(rows, step_rows);
  const at::TensorOptions acc = h.options().dtype(accumulation(h.scalar_type()));
  at::Tensor df_rows = at::zeros({residues, out}, acc), dg_rows = at::zeros({residues, out}, acc);
  at::Tensor dh = need_h ? at::empty({rows, out}, h.options()) : at::empty({0}, h.options());
  if (rows > 0 && out > 0) {
    const std::string chosen = pick_kernel(kernel);
    dispatch(chosen, h.scalar_type(), [&](auto k, auto element) {
      using T = decltype(element);
      using Acc = acc_t<T>;
      using K = decltype(k);
      const Pass<T, Acc> p{h.const_data_ptr<T>(), h.stride(0), dy.const_data_ptr<T>(), dy.stride(0),
                           f.const_data_ptr<Acc>(), g.const_data_ptr<Acc>(),
                           need_h ? dh.mutable_data_ptr<T>() : nullptr, df_rows.mutable_data_ptr<Acc>(),
                           dg_rows.mutable_data_ptr<Acc>(), rows, out, group_size / 2, step_rows};
      const int64_t blocks = (residues + kResidueBlock - 1) / kResidueBlock;
      const int64_t block_elements = std::min(kResidueBlock, residues) * ((rows + step_rows - 1) / step_rows) * out;
      at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / block_elements), [&](int64_t b0, int64_t b1) {
        const int64_t q0 = b0 * kResidueBlock, q1 = std::min(residues, b1 * kResidueBlock);
        if (need_h) K::template backward<true>(p, q0, q1);
        else K::template backward<false>(p, q0, q1);
      });
    });
  }
  return {dh, df_rows.sum(0), dg_rows.sum(0)};
}

}  // namespace

// torch.ops.fastadapt_cpu.road_*: kernel "" runs the torch path's arithmetic (see the top of this file).
TORCH_LIBRARY_FRAGMENT(fastadapt_cpu, m) {
  m.def("road_rotate(Tensor h, Tensor f, Tensor g, int group_size, str kernel='') -> Tensor", &road_rotate);
  m.def("road_rotate_backward(Tensor grad, Tensor h, Tensor f, Tensor g, int group_size, bool need_h, "
        "int step_rows=128, str kernel='') -> Tensor[]", &road_rotate_backward);
  m.def("road_kernels() -> str[]", &kernels);
}
