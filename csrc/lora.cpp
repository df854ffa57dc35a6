// LoRA's (and DoRA's) backward thin products on CPU in one parallel pass over fixed row chunks.
//
//     t       = s dY B                 (N, R)       dY (N, out), B (out, R)
//     dx_low  = t A                    (N, in)      A (R, in); the caller adds dY W into it
//     dA      = t^T x                  (R, in)      x (N, in)
//     dB      = s (u^T dY)^T           (out, R)     u = x A^T (N, R), kept from the forward
//     c       = colsum(dY o y_pre)     (out,)       only where y_pre is passed (DoRA's dm: its caller
//                                                   passes B' = s g o B and scaling 1, so t is DoRA's v
//                                                   and dB is P^T = (u^T dY)^T)
//
// float32 or float64, every operand in one dtype; dy, x, u and y_pre with any row stride and a unit
// column stride (a copy otherwise), A and B made contiguous (parameter-sized).
//
// The torch path runs these as four BLAS calls over all N rows: dY is read twice and x once, each
// in its own pass over (N, d), and t A is written in a pass of its own; the products are thin (R
// multiply-adds per element read), where BLAS's blocking for square products buys little.  Here the
// rows are cut into chunks of ``chunk_rows`` and one task runs a chunk's products back to back while
// its panels of dY and x sit in the core's L2, with the ranks across the lanes of an AVX-512
// register (16 float32 / 8 float64: one rank tile; more ranks, more tiles one after another):
//
//     c_g += colsum(dY_c o y_pre_c)           kRowBlock rows at a time, one register of columns after
//                                             another, just before those rows' pass below
//     t_c = s dY_c B and dB_g += dY_c^T u_c   one pass over dY's columns for kRowBlock rows at a time:
//                                             each dY element, broadcast once, serves both
//     dx_low_c = t_c A                        kRowBlock rows x one register of columns, ranks in order
//     dA_g += t_c^T x_c                       one rank tile x one register of columns in registers,
//                                             kDaRows rows at a time, then added to the partial
//
// The chunks form G = min(chunks, kMaxGroups) groups of consecutive chunks, fixed by N and
// chunk_rows alone; a group's chunks add into the group's zeroed partials dA_g, dB_g, c_g in chunk
// order, and the partials are summed in group order at the end (at::sum over dim 0).  Every sum inside
// a chunk runs in a fixed order (t and dB over dY's columns then the rows in order, dx over the ranks
// in order, dA and c over the rows in order) and the split is fixed: the results are the same bits
// for 1, 2, 3 threads.  The kernels are compiled for AVX-512F by target pragma; ``lora_thin_supported()``
// says whether this CPU runs them (the caller runs the torch path where it does not).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTADAPT_LORA_AVX512 1
#include <immintrin.h>
#else
#define FASTADAPT_LORA_AVX512 0
#endif

namespace {

constexpr int64_t kMaxGroups = 32;   // partials: at most 32 x R x (in + out) entries
constexpr int kRowBlock = 8;         // rows per pass over dY's columns (t, dB, c) and per dx register tile
constexpr int64_t kDaRows = 32;      // rows per dA register tile before it is added to the partial

// What one pass reads and writes.  t, the dA partials and the dB partials carry the rank padded to
// rank_pad, a multiple of the register's lanes (t's padding is zero, so the padded rows of dA and
// columns of dB come out zero; they are cut off at the end).
template <typename T>
struct Pass {
  const T* dy;
  int64_t ldy;
  const T* x;
  int64_t ldx;
  const T* u;        // (N, R) at row stride ldu, or null (no dB)
  int64_t ldu;
  const T* y_pre;    // (N, out) at row stride ly_pre, or null (no c)
  int64_t ly_pre;
  const T* b;        // (out, R) contiguous
  const T* a;        // (R, in) contiguous
  T* t;              // (N, rank_pad) scratch, or null (neither dx nor dA)
  T* dx;             // (N, in) contiguous, or null
  T* da_parts;       // (G, rank_pad, in) zeros, or null
  T* db_parts;       // (G, out, rank_pad) zeros, or null
  T* c_parts;        // (G, out) zeros, or null
  T scale;
  int64_t in, out, rank, rank_pad;
  bool scaled;
};

#if FASTADAPT_LORA_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f")

// One AVX-512 register of T: its lanes and the operations the kernels use (masked: the first n lanes).
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t kCount = 16;
  static M first(int64_t n) { return n >= kCount ? M(0xFFFF) : M((1u << n) - 1u); }
  static V zero() { return _mm512_setzero_ps(); }
  static V all(float v) { return _mm512_set1_ps(v); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(M m, float* p, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
};

template <>
struct Lanes<double> {
  using V = __m512d;
  using M = __mmask8;
  static constexpr int64_t kCount = 8;
  static M first(int64_t n) { return n >= kCount ? M(0xFF) : M((1u << n) - 1u); }
  static V zero() { return _mm512_setzero_pd(); }
  static V all(double v) { return _mm512_set1_pd(v); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static V load(M m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static void store(M m, double* p, V v) { _mm512_mask_storeu_pd(p, m, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
};

// t[i, tile] = s dY_i B[:, tile] and db[:, tile] += dY_i^T u[i, tile] for kRows rows i from ``row``, one
// pass over dY's columns k (db: the group's partial, or null).
template <int kRows, typename T>
__attribute__((always_inline)) inline void t_and_db_rows(const Pass<T>& p, int64_t row, int64_t tile, T* db) {
  using L = Lanes<T>;
  const typename L::M mask = L::first(p.rank - tile);
  typename L::V t[kRows], u[kRows];
  const T* dy[kRows];
  for (int i = 0; i < kRows; ++i) {
    t[i] = L::zero();
    u[i] = db != nullptr ? L::load(mask, p.u + (row + i) * p.ldu + tile) : L::zero();
    dy[i] = p.dy + (row + i) * p.ldy;
  }
  const T* b = p.b + tile;
  for (int64_t k = 0; k < p.out; ++k) {
    const typename L::V bk = L::load(mask, b + k * p.rank);
    if (db != nullptr) {
      T* dbk = db + k * p.rank_pad + tile;
      typename L::V acc = L::load(dbk);
      for (int i = 0; i < kRows; ++i) {
        const typename L::V d = L::all(dy[i][k]);
        t[i] = L::fma(d, bk, t[i]);
        acc = L::fma(d, u[i], acc);
      }
      L::store(dbk, acc);
    } else {
      for (int i = 0; i < kRows; ++i) t[i] = L::fma(L::all(dy[i][k]), bk, t[i]);
    }
  }
  if (p.t != nullptr) {
    for (int i = 0; i < kRows; ++i) {
      L::store(p.t + (row + i) * p.rank_pad + tile, p.scaled ? L::mul(t[i], L::all(p.scale)) : t[i]);
    }
  }
}

// c[:] += sum_i dY[i, :] o y_pre[i, :] over kRows rows i from ``row`` in order, one register of columns
// at a time (c: the group's partial).
template <int kRows, typename T>
__attribute__((always_inline)) inline void colsum_rows(const Pass<T>& p, int64_t row, T* c) {
  using L = Lanes<T>;
  for (int64_t j = 0; j < p.out; j += L::kCount) {
    const typename L::M mask = L::first(p.out - j);
    typename L::V acc = L::load(mask, c + j);
    for (int i = 0; i < kRows; ++i) {
      const int64_t r = row + i;
      acc = L::fma(L::load(mask, p.dy + r * p.ldy + j), L::load(mask, p.y_pre + r * p.ly_pre + j), acc);
    }
    L::store(mask, c + j, acc);
  }
}

// The passes over kRows rows of dY from ``row`` for one rank tile: c (the first tile only, where c is
// wanted), then t and dB (where either is wanted).
template <int kRows, typename T>
__attribute__((always_inline)) inline void dy_rows(const Pass<T>& p, int64_t row, int64_t tile, T* db, T* c) {
  if (c != nullptr && tile == 0) colsum_rows<kRows>(p, row, c);
  if (p.t != nullptr || db != nullptr) t_and_db_rows<kRows>(p, row, tile, db);
}

// dx[i, :] = sum_r t[i, r] A[r, :] for kRows rows i from ``row``, one register of columns at a time.
template <int kRows, typename T>
__attribute__((always_inline)) inline void dx_rows(const Pass<T>& p, int64_t row) {
  using L = Lanes<T>;
  for (int64_t j = 0; j < p.in; j += L::kCount) {
    const typename L::M mask = L::first(p.in - j);
    typename L::V acc[kRows];
    for (int i = 0; i < kRows; ++i) acc[i] = L::zero();
    for (int64_t r = 0; r < p.rank; ++r) {
      const typename L::V ar = L::load(mask, p.a + r * p.in + j);
      for (int i = 0; i < kRows; ++i) acc[i] = L::fma(L::all(p.t[(row + i) * p.rank_pad + r]), ar, acc[i]);
    }
    for (int i = 0; i < kRows; ++i) L::store(mask, p.dx + (row + i) * p.in + j, acc[i]);
  }
}

// da[tile ranks, :] += t[rows, tile]^T x[rows, :] for rows [r0, r1), one rank tile x one register of
// columns in registers.
template <typename T>
__attribute__((always_inline)) inline void da_rows(const Pass<T>& p, int64_t r0, int64_t r1, int64_t tile, T* da) {
  using L = Lanes<T>;
  for (int64_t j = 0; j < p.in; j += L::kCount) {
    const typename L::M mask = L::first(p.in - j);
    typename L::V acc[L::kCount];
    for (int r = 0; r < L::kCount; ++r) acc[r] = L::zero();
    for (int64_t i = r0; i < r1; ++i) {
      const typename L::V xi = L::load(mask, p.x + i * p.ldx + j);
      const T* ti = p.t + i * p.rank_pad + tile;
      for (int r = 0; r < L::kCount; ++r) acc[r] = L::fma(L::all(ti[r]), xi, acc[r]);
    }
    for (int r = 0; r < L::kCount; ++r) {
      T* out = da + (tile + r) * p.in + j;
      L::store(mask, out, L::add(L::load(mask, out), acc[r]));
    }
  }
}

// One chunk, rows [r0, r1), into the partials of ``group``.
template <typename T>
__attribute__((flatten)) void run_chunk(const Pass<T>& p, int64_t r0, int64_t r1, int64_t group) {
  constexpr int64_t kLanes = Lanes<T>::kCount;
  T* db = p.db_parts != nullptr ? p.db_parts + group * p.out * p.rank_pad : nullptr;
  T* da = p.da_parts != nullptr ? p.da_parts + group * p.rank_pad * p.in : nullptr;
  T* c = p.c_parts != nullptr ? p.c_parts + group * p.out : nullptr;
  for (int64_t tile = 0; tile < p.rank; tile += kLanes) {
    int64_t i = r0;
    for (; i + kRowBlock <= r1; i += kRowBlock) dy_rows<kRowBlock>(p, i, tile, db, c);
    for (; i < r1; ++i) dy_rows<1>(p, i, tile, db, c);
  }
  if (p.dx != nullptr) {
    int64_t i = r0;
    for (; i + kRowBlock <= r1; i += kRowBlock) dx_rows<kRowBlock>(p, i);
    for (; i < r1; ++i) dx_rows<1>(p, i);
  }
  if (da != nullptr) {
    for (int64_t tile = 0; tile < p.rank; tile += kLanes) {
      for (int64_t i = r0; i < r1; i += kDaRows) da_rows(p, i, std::min(r1, i + kDaRows), tile, da);
    }
  }
}

#pragma GCC pop_options
#endif  // FASTADAPT_LORA_AVX512

bool supported() {
#if FASTADAPT_LORA_AVX512
  static const bool found = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return found;
#else
  return false;
#endif
}

// ---- checks --------------------------------------------------------------------------------------

// t (rows, cols) with a unit column stride and a row stride of at least cols (a contiguous copy otherwise).
at::Tensor rows_of(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == cols, name, " must be 2-D with ", cols, " columns; got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), "; pass it in dy's dtype ", dtype);
  TORCH_CHECK_TYPE(t.device().is_cpu(), name, " must be a CPU tensor");
  const bool plain_rows = (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) >= cols);
  return plain_rows ? t : t.contiguous();
}

// ---- op ------------------------------------------------------------------------------------------

// [dx_low (N, in) or empty, dA (R, in) or empty, dB (out, R) or empty, c (out,) or empty (no y_pre)].
std::vector<at::Tensor> lora_backward_thin(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& u_in,
                                           const at::Tensor& b_in, const at::Tensor& a_in, double scaling,
                                           bool need_dx, bool need_da, bool need_db, int64_t chunk_rows,
                                           const std::optional<at::Tensor>& y_pre_in) {
  TORCH_CHECK(supported(), "lora_backward_thin needs a CPU with AVX-512F (lora_thin_supported() is False here)");
  TORCH_CHECK_VALUE(dy_in.dim() == 2, "dy must be 2-D (N, out); got shape ", dy_in.sizes());
  const at::ScalarType dtype = dy_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, "dy has dtype ", dtype, "; valid: float32, float64");
  TORCH_CHECK_VALUE(chunk_rows > 0, "chunk_rows=", chunk_rows, " must be positive (e.g. 128)");
  TORCH_CHECK_VALUE(a_in.dim() == 2 && b_in.dim() == 2, "A must be (R, in) and B (out, R); got ", a_in.sizes(),
                    " and ", b_in.sizes());
  const int64_t rows = dy_in.size(0), out = dy_in.size(1), rank = a_in.size(0), in = a_in.size(1);
  const at::Tensor dy = rows_of("dy", dy_in, dtype, out);
  const at::Tensor x = rows_of("x", x_in, dtype, in);
  const at::Tensor b = rows_of("B", b_in, dtype, rank).contiguous();
  const at::Tensor a = rows_of("A", a_in, dtype, in).contiguous();
  TORCH_CHECK_VALUE(b.size(0) == out, "B has ", b.size(0), " rows but dy has ", out, " columns");
  TORCH_CHECK_VALUE(x.size(0) == rows, "x has ", x.size(0), " rows but dy has ", rows);
  const at::Tensor u = need_db ? rows_of("u", u_in, dtype, rank) : u_in;
  TORCH_CHECK_VALUE(!need_db || u.size(0) == rows, "u has ", u.size(0), " rows but dy has ", rows);
  const bool need_c = y_pre_in.has_value();
  const at::Tensor y_pre = need_c ? rows_of("y_pre", *y_pre_in, dtype, out) : at::Tensor();
  TORCH_CHECK_VALUE(!need_c || y_pre.size(0) == rows, "y_pre has ", need_c ? y_pre.size(0) : 0, " rows but dy has ",
                    rows);

  const at::TensorOptions options = dy.options();
  const int64_t lanes = dtype == at::kFloat ? 16 : 8, rank_pad = (rank + lanes - 1) / lanes * lanes;
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows, groups = std::min(chunks, kMaxGroups);
  const int64_t parts = std::max<int64_t>(groups, 1);   // no rows: one zero partial
  const bool need_t = need_dx || need_da;
  at::Tensor dx = need_dx ? at::empty({rows, in}, options) : at::empty({0}, options);
  at::Tensor da_parts = need_da ? at::zeros({parts, rank_pad, in}, options) : at::empty({0}, options);
  at::Tensor db_parts = need_db ? at::zeros({parts, out, rank_pad}, options) : at::empty({0}, options);
  at::Tensor c_parts = need_c ? at::zeros({parts, out}, options) : at::empty({0}, options);
  at::Tensor t = at::empty({need_t ? rows : 0, rank_pad}, options);
#if FASTADAPT_LORA_AVX512
  AT_DISPATCH_FLOATING_TYPES(dtype, "lora_backward_thin", [&] {
    using T = scalar_t;
    const Pass<T> p{dy.const_data_ptr<T>(), dy.stride(0), x.const_data_ptr<T>(), x.stride(0),
                    need_db ? u.const_data_ptr<T>() : nullptr, need_db ? u.stride(0) : 0,
                    need_c ? y_pre.const_data_ptr<T>() : nullptr, need_c ? y_pre.stride(0) : 0,
                    b.const_data_ptr<T>(), a.const_data_ptr<T>(), need_t ? t.mutable_data_ptr<T>() : nullptr,
                    need_dx ? dx.mutable_data_ptr<T>() : nullptr, need_da ? da_parts.mutable_data_ptr<T>() : nullptr,
                    need_db ? db_parts.mutable_data_ptr<T>() : nullptr,
                    need_c ? c_parts.mutable_data_ptr<T>() : nullptr, static_cast<T>(scaling), in, out, rank,
                    rank_pad, scaling != 1.0};
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        for (int64_t c = g * chunks / groups; c < (g + 1) * chunks / groups; ++c) {
          run_chunk(p, c * chunk_rows, std::min(rows, (c + 1) * chunk_rows), g);
        }
      }
    });
  });
#endif
  at::Tensor da = at::empty({0}, options), db = at::empty({0}, options), c = at::empty({0}, options);
  if (need_da) da = (groups > 1 ? da_parts.sum(0) : da_parts[0]).narrow(0, 0, rank);
  if (need_db) {
    const at::Tensor sum = (groups > 1 ? db_parts.sum(0) : db_parts[0]).narrow(1, 0, rank);
    db = (scaling != 1.0 ? sum.mul(scaling) : sum).contiguous();
  }
  if (need_c) c = groups > 1 ? c_parts.sum(0) : c_parts[0];
  return {dx, da, db, c};
}

}  // namespace

// torch.ops.fastadapt_cpu.lora_backward_thin: the products above (the caller adds dY W into dx_low),
// c where y_pre is passed; lora_thin_supported(): whether this CPU runs them.
TORCH_LIBRARY_FRAGMENT(fastadapt_cpu, m) {
  m.def("lora_backward_thin(Tensor dy, Tensor x, Tensor u, Tensor B, Tensor A, float scaling, bool need_dx, "
        "bool need_dA, bool need_dB, int chunk_rows=128, Tensor? y_pre=None) -> Tensor[]", &lora_backward_thin);
  m.def("lora_thin_supported() -> bool", &supported);
}
