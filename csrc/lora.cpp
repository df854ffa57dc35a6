// LoRA's backward thin products on CPU in one parallel pass over fixed row chunks.
//
//     t       = s dY B                 (N, R)       dY (N, out), B (out, R)
//     dx_low  = t A                    (N, in)      A (R, in); the caller adds dY W into it
//     dA      = t^T x                  (R, in)      x (N, in)
//     dB      = s (u^T dY)^T           (out, R)     u = x A^T (N, R), kept from the forward
//
// float32 or float64, every operand in one dtype; dy, x and u with any row stride and a unit column
// stride (a copy otherwise), A and B made contiguous (parameter-sized).
//
// The torch path runs these as four BLAS calls over all N rows: dY is read twice and x once, each
// in its own pass over (N, d), and t A's output is written in a pass of its own; the products are
// thin (R = 16: 16 multiply-adds per element read), so BLAS's blocking for square products buys
// little.  Here the rows are cut into chunks of ``chunk_rows`` and one task runs a chunk's products
// back to back while its panels of dY and x sit in the core's L2:
//
//     t_c = s dY_c B;  dB_g += dY_c^T u_c;  dx_low_c = t_c A;  dA_g += t_c^T x_c
//
// float32 on a CPU with AVX-512 (picked at run time; the kernels are compiled for it by target
// pragma): hand-vectorised, 16 ranks per register, t and dB in one pass over dY's columns for 8 rows
// at a time (each dY element broadcast once serves both), dx for 8 rows per 16 columns, dA for 16
// ranks x 16 columns in registers over 32 rows.  Otherwise (float64, other CPUs) each product is a
// single-threaded BLAS call (sgemm_ / dgemm_ of the BLAS torch links, looked up at load; at::mm on
// the chunk's views where there is none).
//
// The chunks form G = min(chunks, kMaxGroups) groups of consecutive chunks, fixed by N and
// chunk_rows alone; a group's chunks add into the group's zeroed partials dA_g, dB_g in chunk order,
// and the partials are summed in group order at the end (at::sum over dim 0).  Every sum inside a
// chunk runs in a fixed order (t and dB over dY's columns and the rows in order, dx over the ranks,
// dA over the rows), each BLAS call runs on one thread (MKL's thread-local count is set to 1 inside
// a task), and the split is fixed: the results are the same bits for 1, 2, 3 threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <dlfcn.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTADAPT_LORA_AVX512 1
#include <immintrin.h>
#else
#define FASTADAPT_LORA_AVX512 0
#endif

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxGroups = 32;   // partials: at most 32 x R x (in + out) entries

// Fortran BLAS (column-major, LP64): C = alpha op(A) op(B) + beta C.
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using DgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                         const int*, const double*, const int*, const double*, double*, const int*);
using SetLocalThreadsFn = int (*)(int);

// A symbol of the BLAS torch links: the global scope first, then libtorch_cpu's own dependency tree
// (torch is loaded RTLD_LOCAL, so its MKL is not in the global scope).
void* blas_symbol(const char* name) {
  if (void* found = dlsym(RTLD_DEFAULT, name)) return found;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) == 0 || info.dli_fname == nullptr) return nullptr;
  void* torch_cpu = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  return torch_cpu == nullptr ? nullptr : dlsym(torch_cpu, name);
}

struct Blas {
  SgemmFn sgemm = nullptr;
  DgemmFn dgemm = nullptr;
  SetLocalThreadsFn set_local_threads = nullptr;   // MKL_Set_Num_Threads_Local (C API), where MKL is the BLAS
};

const Blas& blas() {
  static const Blas found = [] {
    Blas b;
    b.sgemm = reinterpret_cast<SgemmFn>(blas_symbol("sgemm_"));
    b.dgemm = reinterpret_cast<DgemmFn>(blas_symbol("dgemm_"));
    b.set_local_threads = reinterpret_cast<SetLocalThreadsFn>(blas_symbol("MKL_Set_Num_Threads_Local"));
    return b;
  }();
  return found;
}

// Row-major C (m, n) = alpha X (m, k) Y (k, n) + beta C, X and Y optionally transposed (trans_x: X is
// stored (k, m)), leading dimensions in elements.  Column-major BLAS computes C^T = Y^T X^T.
template <typename T>
void gemm(bool trans_x, bool trans_y, int64_t m, int64_t n, int64_t k, const T* x, int64_t ldx, const T* y,
          int64_t ldy, T beta, T* c, int64_t ldc) {
  const char ty = trans_y ? 'T' : 'N', tx = trans_x ? 'T' : 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int lx = static_cast<int>(std::max<int64_t>(ldx, 1)), ly = static_cast<int>(std::max<int64_t>(ldy, 1));
  const int lc = static_cast<int>(std::max<int64_t>(ldc, 1));
  const T one = 1;
  if constexpr (std::is_same_v<T, float>) {
    blas().sgemm(&ty, &tx, &mi, &ni, &ki, &one, y, &ly, x, &lx, &beta, c, &lc);
  } else {
    blas().dgemm(&ty, &tx, &mi, &ni, &ki, &one, y, &ly, x, &lx, &beta, c, &lc);
  }
}

// The same product through ATen (no BLAS symbol found): on row-major views of the operands.
at::Tensor view(const at::Tensor& like, const void* data, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  auto t = at::from_blob(const_cast<void*>(data), {trans ? cols : rows, trans ? rows : cols},
                         {std::max<int64_t>(ld, 1), 1}, like.options());
  return trans ? t.t() : t;
}

template <typename T>
void gemm_aten(const at::Tensor& like, bool trans_x, bool trans_y, int64_t m, int64_t n, int64_t k, const T* x,
               int64_t ldx, const T* y, int64_t ldy, T beta, T* c, int64_t ldc) {
  at::Tensor cv = view(like, c, m, n, ldc, false);
  at::Tensor prod = at::mm(view(like, x, m, k, ldx, trans_x), view(like, y, k, n, ldy, trans_y));
  if (beta == T(0)) cv.copy_(prod);
  else cv.add_(prod);
}

// What one pass reads and writes.  t, the dA partials and the dB partials carry the rank padded to
// rank_pad columns / rows (16 for the AVX-512 kernels, R itself for BLAS; t's padding columns are
// zero, so the padded rows of dA and columns of dB come out zero and are cut off at the end).
template <typename T>
struct Pass {
  const T* dy;
  int64_t ldy;
  const T* x;
  int64_t ldx;
  const T* u;
  int64_t ldu;
  const T* b;        // (out, R) contiguous
  const T* a;        // (R, in) contiguous
  T* t;              // (N, rank_pad) scratch
  T* dx;             // (N, in) contiguous, or null
  T* da_parts;       // (G, rank_pad, in) zeros, or null
  T* db_parts;       // (G, out, rank_pad) zeros, or null
  T scale;
  int64_t in, out, rank, rank_pad;
  bool scaled;
};

// One chunk, rows [r0, r1), by BLAS calls; the partials of ``group`` accumulate (beta = 1).
template <typename T, typename Gemm>
void blas_chunk(const Pass<T>& p, const Gemm& mm, int64_t r0, int64_t r1, int64_t group) {
  const int64_t m = r1 - r0, rp = p.rank_pad;
  T* t = p.t + r0 * rp;
  const T* dy = p.dy + r0 * p.ldy;
  if (p.dx != nullptr || p.da_parts != nullptr) {
    mm(false, false, m, p.rank, p.out, dy, p.ldy, p.b, p.rank, T(0), t, rp);          // dY_c B
    if (p.scaled) {
      for (int64_t i = 0; i < m * rp; ++i) t[i] *= p.scale;
    }
  }
  if (p.db_parts != nullptr) {                                                       // dY_c^T u_c
    mm(true, false, p.out, p.rank, m, dy, p.ldy, p.u + r0 * p.ldu, p.ldu, T(1), p.db_parts + group * p.out * rp, rp);
  }
  if (p.dx != nullptr) {                                                             // t_c A
    mm(false, false, m, p.in, p.rank, t, rp, p.a, p.in, T(0), p.dx + r0 * p.in, p.in);
  }
  if (p.da_parts != nullptr) {                                                       // t_c^T x_c
    mm(true, false, p.rank, p.in, m, t, rp, p.x + r0 * p.ldx, p.ldx, T(1), p.da_parts + group * rp * p.in, p.in);
  }
}

#if FASTADAPT_LORA_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f")
// float32 on AVX-512: 16 ranks (one rank tile) per register, rank tiles one after another.  Every
// sum runs in a fixed order: t and dB over dY's columns / the chunk's rows in order, dx over the
// ranks in order, dA over the chunk's rows in order.

constexpr int64_t kLanes = 16;
constexpr int64_t kRowBlock = 8;      // rows per pass over dY's columns (t, dB) and per dx tile
constexpr int64_t kDaRows = 32;       // rows per dA register tile before it is added to the partial

inline __mmask16 lanes(int64_t n) { return n >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// t[i, tile] = s dY_i B[:, tile] and dB[:, tile] += dY_i^T u[i, tile] for kRows rows i, one pass over
// dY's columns k: dY[i, k] broadcast once serves both.
template <int kRows>
__attribute__((always_inline)) inline void t_and_db_rows(const Pass<float>& p, int64_t row, int64_t tile, float* db) {
  const __mmask16 mask = lanes(p.rank - tile);
  __m512 t[kRows], u[kRows];
  const float* dy[kRows];
  for (int i = 0; i < kRows; ++i) {
    t[i] = _mm512_setzero_ps();
    u[i] = p.u != nullptr ? _mm512_maskz_loadu_ps(mask, p.u + (row + i) * p.ldu + tile) : _mm512_setzero_ps();
    dy[i] = p.dy + (row + i) * p.ldy;
  }
  const bool want_t = p.dx != nullptr || p.da_parts != nullptr;
  const float* b = p.b + tile;
  for (int64_t k = 0; k < p.out; ++k) {
    const __m512 bk = _mm512_maskz_loadu_ps(mask, b + k * p.rank);
    if (db != nullptr) {
      __m512 acc = _mm512_loadu_ps(db + k * p.rank_pad + tile);
      for (int i = 0; i < kRows; ++i) {
        const __m512 d = _mm512_set1_ps(dy[i][k]);
        t[i] = _mm512_fmadd_ps(d, bk, t[i]);
        acc = _mm512_fmadd_ps(d, u[i], acc);
      }
      _mm512_storeu_ps(db + k * p.rank_pad + tile, acc);
    } else {
      for (int i = 0; i < kRows; ++i) t[i] = _mm512_fmadd_ps(_mm512_set1_ps(dy[i][k]), bk, t[i]);
    }
  }
  if (want_t) {
    const __m512 s = _mm512_set1_ps(p.scale);
    for (int i = 0; i < kRows; ++i) {
      _mm512_storeu_ps(p.t + (row + i) * p.rank_pad + tile, p.scaled ? _mm512_mul_ps(t[i], s) : t[i]);
    }
  }
}

// dx[i, j tile] = sum_r t[i, r] A[r, j tile] for kRows rows, every column tile, ranks in order.
template <int kRows>
__attribute__((always_inline)) inline void dx_rows(const Pass<float>& p, int64_t row) {
  for (int64_t j = 0; j < p.in; j += kLanes) {
    const __mmask16 mask = lanes(p.in - j);
    __m512 acc[kRows];
    for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t r = 0; r < p.rank; ++r) {
      const __m512 ar = _mm512_maskz_loadu_ps(mask, p.a + r * p.in + j);
      for (int i = 0; i < kRows; ++i) {
        acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(p.t[(row + i) * p.rank_pad + r]), ar, acc[i]);
      }
    }
    for (int i = 0; i < kRows; ++i) _mm512_mask_storeu_ps(p.dx + (row + i) * p.in + j, mask, acc[i]);
  }
}

// dA[tile ranks, :] += t[rows, tile]^T x[rows, :] for rows [r0, r1) (at most kDaRows), 16 ranks in registers.
__attribute__((always_inline)) inline void da_rows(const Pass<float>& p, int64_t r0, int64_t r1, int64_t tile,
                                                   float* da) {
  for (int64_t j = 0; j < p.in; j += kLanes) {
    const __mmask16 mask = lanes(p.in - j);
    __m512 acc[kLanes];
    for (int r = 0; r < kLanes; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t i = r0; i < r1; ++i) {
      const __m512 xi = _mm512_maskz_loadu_ps(mask, p.x + i * p.ldx + j);
      const float* ti = p.t + i * p.rank_pad + tile;
      for (int r = 0; r < kLanes; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(ti[r]), xi, acc[r]);
    }
    for (int r = 0; r < kLanes; ++r) {
      float* row = da + (tile + r) * p.in + j;
      _mm512_mask_storeu_ps(row, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, row), acc[r]));
    }
  }
}

// One chunk, rows [r0, r1), on AVX-512 (float32).
__attribute__((flatten)) void avx512_chunk(const Pass<float>& p, int64_t r0, int64_t r1, int64_t group) {
  float* db = p.db_parts != nullptr ? p.db_parts + group * p.out * p.rank_pad : nullptr;
  float* da = p.da_parts != nullptr ? p.da_parts + group * p.rank_pad * p.in : nullptr;
  for (int64_t tile = 0; tile < p.rank; tile += kLanes) {
    int64_t i = r0;
    for (; i + kRowBlock <= r1; i += kRowBlock) t_and_db_rows<kRowBlock>(p, i, tile, db);
    for (; i < r1; ++i) t_and_db_rows<1>(p, i, tile, db);
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

bool has_avx512() {
  static const bool found = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return found;
}
#endif  // FASTADAPT_LORA_AVX512

// ---- kernel choice ---------------------------------------------------------------------------------

// The kernels that run ``dtype`` here, fastest first: "avx512" (float32, AVX-512 CPUs), "blas"
// (where the BLAS symbols were found), "aten" (at::mm per product, always).
std::vector<std::string> kernels(at::ScalarType dtype) {
  std::vector<std::string> found;
#if FASTADAPT_LORA_AVX512
  if (dtype == at::kFloat && has_avx512()) found.emplace_back("avx512");
#endif
  if (dtype == at::kFloat ? blas().sgemm != nullptr : blas().dgemm != nullptr) found.emplace_back("blas");
  found.emplace_back("aten");
  return found;
}

std::string pick_kernel(const std::string& kernel, at::ScalarType dtype) {
  const std::vector<std::string> available = kernels(dtype);
  if (kernel.empty()) return available.front();
  TORCH_CHECK_VALUE(std::find(available.begin(), available.end(), kernel) != available.end(), "kernel=", kernel,
                    " is not available for ", dtype, " on this CPU; valid choices: ", available,
                    " (or '' for the first)");
  return kernel;
}

// ---- checks --------------------------------------------------------------------------------------

// t (rows, cols) with a unit column stride and a row stride BLAS takes (a contiguous copy otherwise).
at::Tensor rows_of(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == cols, name, " must be 2-D with ", cols, " columns; got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), "; pass it in dy's dtype ", dtype);
  TORCH_CHECK_TYPE(t.device().is_cpu(), name, " must be a CPU tensor");
  const bool blas_rows = (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) >= cols);
  return blas_rows ? t : t.contiguous();
}

// ---- op ------------------------------------------------------------------------------------------

// [dx_low (N, in) or empty, dA (R, in) or empty, dB (out, R) or empty].
std::vector<at::Tensor> lora_backward_thin(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& u_in,
                                           const at::Tensor& b_in, const at::Tensor& a_in, double scaling,
                                           bool need_dx, bool need_da, bool need_db, int64_t chunk_rows,
                                           const std::string& kernel) {
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
  for (int64_t size : {rows, out, in, rank, chunk_rows}) {
    TORCH_CHECK_VALUE(size < INT_MAX / 2, "dimension ", size, " exceeds the BLAS's 32-bit sizes");
  }
  const at::TensorOptions options = dy.options();
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows, groups = std::min(chunks, kMaxGroups);
  const std::string chosen = pick_kernel(kernel, dtype);
  const bool vectorised = chosen == "avx512";
  const int64_t rank_pad = vectorised ? (rank + 15) / 16 * 16 : rank;
  const int64_t parts = std::max<int64_t>(groups, 1);
  at::Tensor dx = need_dx ? at::empty({rows, in}, options) : at::empty({0}, options);
  at::Tensor da_parts = need_da ? at::zeros({parts, rank_pad, in}, options) : at::empty({0}, options);
  at::Tensor db_parts = need_db ? at::zeros({parts, out, rank_pad}, options) : at::empty({0}, options);
  at::Tensor t = at::empty({(need_dx || need_da) ? rows : 0, rank_pad}, options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "lora_backward_thin", [&] {
    using T = scalar_t;
    const Pass<T> p{dy.const_data_ptr<T>(), dy.stride(0), x.const_data_ptr<T>(), x.stride(0),
                    need_db ? u.const_data_ptr<T>() : nullptr, need_db ? u.stride(0) : 0, b.const_data_ptr<T>(),
                    a.const_data_ptr<T>(), t.mutable_data_ptr<T>(), need_dx ? dx.mutable_data_ptr<T>() : nullptr,
                    need_da ? da_parts.mutable_data_ptr<T>() : nullptr,
                    need_db ? db_parts.mutable_data_ptr<T>() : nullptr, static_cast<T>(scaling), in, out, rank,
                    rank_pad, scaling != 1.0};
    // chunk(r0, r1, group) over the fixed groups, one thread per call of BLAS
    const auto run_groups = [&](const auto& chunk) {
      at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
        const int previous = blas().set_local_threads ? blas().set_local_threads(1) : 0;
        for (int64_t g = g0; g < g1; ++g) {
          for (int64_t c = g * chunks / groups; c < (g + 1) * chunks / groups; ++c) {
            chunk(c * chunk_rows, std::min(rows, (c + 1) * chunk_rows), g);
          }
        }
        if (blas().set_local_threads) blas().set_local_threads(previous);
      });
    };
#if FASTADAPT_LORA_AVX512
    if (vectorised) {   // float32 (a generic lambda: the call is compiled for Pass<float> alone)
      return [&](const auto& pass) {
        if constexpr (std::is_same_v<std::decay_t<decltype(pass)>, Pass<float>>) {
          run_groups([&](int64_t r0, int64_t r1, int64_t g) { avx512_chunk(pass, r0, r1, g); });
        }
      }(p);
    }
#endif
    if (chosen == "blas") {
      const auto mm = [](auto... args) { gemm<T>(args...); };
      run_groups([&](int64_t r0, int64_t r1, int64_t g) { blas_chunk(p, mm, r0, r1, g); });
    } else {
      const auto mm = [&](auto... args) { gemm_aten<T>(dy, args...); };
      run_groups([&](int64_t r0, int64_t r1, int64_t g) { blas_chunk(p, mm, r0, r1, g); });
    }
  });
  at::Tensor da = at::empty({0}, options), db = at::empty({0}, options);
  if (need_da) {
    da = (groups > 1 ? da_parts.sum(0) : da_parts[0]).narrow(0, 0, rank);
  }
  if (need_db) {
    const at::Tensor sum = (groups > 1 ? db_parts.sum(0) : db_parts[0]).narrow(1, 0, rank);
    db = (scaling != 1.0 ? sum.mul(scaling) : sum).contiguous();
  }
  return {dx, da, db};
}

}  // namespace

// torch.ops.fastadapt_cpu.lora_backward_thin: the products above (kernel "": the fastest of
// lora_kernels(dtype)); the caller adds dY W into dx_low.
TORCH_LIBRARY_FRAGMENT(fastadapt_cpu, m) {
  m.def("lora_backward_thin(Tensor dy, Tensor x, Tensor u, Tensor B, Tensor A, float scaling, bool need_dx, "
        "bool need_dA, bool need_dB, int chunk_rows=128, str kernel='') -> Tensor[]", &lora_backward_thin);
  m.def("lora_kernels(ScalarType dtype) -> str[]", &kernels);
}
