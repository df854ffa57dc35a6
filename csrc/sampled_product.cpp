// SHiRA's sampled product on CPU: the K entries of dY^T x at CSR positions, never the whole product.
//
//     values[k] = sum_n dY[n, p_k] x[n, q_k]      dY (N, out), x (N, in), any strides
//
// with the positions in CSR order (crow (out + 1,), ccol (K,) int32: positions of row p are
// k = crow[p] .. crow[p + 1], in any column order, repeats allowed), values in the accumulation
// type (float32 for float32 / float16 / bfloat16 inputs, float64 for float64).
//
// Each entry is a dot over the tokens of one dY column and one x column, both strided in (N, d)
// rows, so the work runs over token chunks of T tokens (T from ``in`` alone: the transposed x chunk,
// in x T floats, is ~256 KiB and stays in L2).  The chunks form token blocks (a split fixed by N and
// T, at least kMinBlockTokens tokens each); the at::parallel_for tasks take blocks one at a time
// (an atomic counter), with no other synchronisation, and per chunk:
//
//   1. x's and dY's chunks are transposed into xT (in, Tp) and dyT (out, Tp) in the accumulation
//      type (half inputs converted here; Tp = T rounded up to 8 lanes, the padding zero);
//   2. for each row p, the chunk's dots of dyT[p] with xT[q_k] for blocks of 8 positions (register
//      blocking: one load of dY's vector serves 8 positions), 8 lanes per position, each chunk sum
//      added to the block's partial values (block 0: values itself).
//
// The partials of blocks 1, 2, ... are added to values in block order at the end.
//
// Arithmetic order, the same on every instruction set and thread count (the result does not depend
// on either, bit for bit): lane l of position k sums dY x over tokens t = l mod 8 of the chunk in
// token order, each product rounded before its add (no fused multiply-add: the extension is built
// with -ffp-contract=off, and Zen / Intel cores run the adds beside the multiplies); the chunk sum
// is ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)); chunk sums add up in token order within a
// block, blocks in block order.  T depends on ``in`` only (or is given), blocks on N and T.  AVX2
// where the CPU has it (picked at run time; this file's AVX2 functions are compiled for it by
// target pragma), portable C++ otherwise.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTADAPT_SAMPLED_AVX2 1
#include <immintrin.h>
#else
#define FASTADAPT_SAMPLED_AVX2 0
#endif

namespace {

constexpr int64_t kLanes = 8;                  // float32 lanes of a 256-bit register
constexpr int64_t kBlock = 8;                  // positions of one row per load of dY's vector
constexpr int64_t kChunkBytes = 256 * 1024;    // xT per chunk: in x T floats, well inside a 1 MiB L2
constexpr int64_t kMinChunkTokens = 32, kMaxChunkTokens = 512;
constexpr int64_t kMinBlockTokens = 256, kMaxBlocks = 32;  // token blocks: one task and one partial each
constexpr int64_t kAddGrain = 1 << 14;          // partials' entries per task of the final sum

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

int64_t default_chunk_tokens(int64_t in, int64_t element_size) {
  const int64_t t = kChunkBytes / (std::max<int64_t>(in, 1) * element_size) / kLanes * kLanes;
  return std::clamp(t, kMinChunkTokens, kMaxChunkTokens);
}

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- portable C++ (the reference order of the arithmetic; every dtype) ----------------------------

// dst[(c - c0) * ld + t] = src[t, c] for t0 <= t < rows, c0 <= c < c1 (converted to Acc), and zero
// for the padding tokens rows .. ld.  src(t, c) = src[t * s0 + c * s1].
template <typename T, typename Acc>
void transpose_scalar(const T* src, int64_t s0, int64_t s1, int64_t t0, int64_t rows, int64_t c0, int64_t c1,
                      Acc* dst, int64_t ld) {
  for (int64_t c = c0; c < c1; ++c) {
    Acc* column = dst + (c - c0) * ld;
    for (int64_t t = t0; t < rows; ++t) column[t] = static_cast<Acc>(src[t * s0 + c * s1]);
    std::fill(column + rows, column + ld, Acc(0));
  }
}

// out[j] += the chunk dot of dy with columns[j] (nvec vectors of 8 lanes), j < count <= B.
template <typename Acc, int B>
void dot_block_scalar(const Acc* dy, const Acc* const* columns, int64_t nvec, Acc* out, int64_t count) {
  Acc acc[B][kLanes] = {};
  for (int64_t v = 0; v < nvec; ++v) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const Acc d = dy[v * kLanes + l];
      for (int j = 0; j < B; ++j) {
        const Acc product = d * columns[j][v * kLanes + l];
        acc[j][l] = acc[j][l] + product;
      }
    }
  }
  for (int64_t j = 0; j < count; ++j) {
    const Acc lo = (acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3]);
    const Acc hi = (acc[j][4] + acc[j][5]) + (acc[j][6] + acc[j][7]);
    out[j] += lo + hi;
  }
}

// The positions of one row in blocks of kBlock (a last partial block of more than 4 as a padded 8,
// else as a padded 4: padding columns point at zeros and are not stored).  Kernel::block<B> is the
// instruction set's dot_block.
template <typename Kernel, typename Acc>
inline void dot_row(const Acc* dy, const Acc* xT, int64_t ld, const int32_t* cols, int64_t count, Acc* out,
                    const Acc* zeros) {
  const int64_t nvec = ld / kLanes;
  const Acc* columns[kBlock];
  for (int64_t k = 0; k < count; k += kBlock) {
    const int64_t n = std::min(kBlock, count - k);
    for (int64_t j = 0; j < kBlock; ++j) columns[j] = j < n ? xT + cols[k + j] * ld : zeros;
    if (n > 4) Kernel::template block<8>(dy, columns, nvec, out + k, n);
    else Kernel::template block<4>(dy, columns, nvec, out + k, n);
  }
}

template <typename Acc>
struct ScalarKernel {
  template <int B>
  static void block(const Acc* dy, const Acc* const* columns, int64_t nvec, Acc* out, int64_t count) {
    dot_block_scalar<Acc, B>(dy, columns, nvec, out, count);
  }
  template <typename T>
  static void transpose(const T* src, int64_t s0, int64_t s1, int64_t rows, int64_t c0, int64_t c1, Acc* dst,
                        int64_t ld) {
    transpose_scalar<T, Acc>(src, s0, s1, 0, rows, c0, c1, dst, ld);
  }
  static void row(const Acc* dy, const Acc* xT, int64_t ld, const int32_t* cols, int64_t count, Acc* out,
                  const Acc* zeros) {
    dot_row<ScalarKernel>(dy, xT, ld, cols, count, out, zeros);
  }
};

// ---- AVX2 (float32 arithmetic; this section is compiled for AVX2 + F16C) ------------------------
#if FASTADAPT_SAMPLED_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,f16c")

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bfloat16 -> float32: the 16 bits above 16 zero bits
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

struct Avx2Kernel {
  template <int B>
  static void block(const float* dy, const float* const* columns, int64_t nvec, float* out, int64_t count) {
    static_assert(B == 4 || B == 8, "blocks of 4 or 8 positions");
    __m256 acc[B];
    for (int j = 0; j < B; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t v = 0; v < nvec; ++v) {
      const __m256 d = _mm256_loadu_ps(dy + v * kLanes);
      for (int j = 0; j < B; ++j)
        acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(d, _mm256_loadu_ps(columns[j] + v * kLanes)));
    }
    // hadd(hadd(a0, a1), hadd(a2, a3)) holds (l0 + l1) + (l2 + l3) of a0..a3 in its low half and
    // (l4 + l5) + (l6 + l7) in its high half.
    const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    alignas(32) float sums[8];
    if constexpr (B == 8) {
      const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
      const __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
      if (count == 8) {
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), s));
        return;
      }
      _mm256_store_ps(sums, s);
    } else {
      _mm_store_ps(sums, _mm_add_ps(_mm256_castps256_ps128(q0), _mm256_extractf128_ps(q0, 1)));
    }
    for (int64_t j = 0; j < count; ++j) out[j] += sums[j];
  }

  // 8 x 8 tiles through registers (unit column stride), the ragged edges by the portable loop.
  template <typename T>
  static void transpose(const T* src, int64_t s0, int64_t s1, int64_t rows, int64_t c0, int64_t c1, float* dst,
                        int64_t ld) {
    if (s1 != 1) return transpose_scalar<T, float>(src, s0, s1, 0, rows, c0, c1, dst, ld);
    const int64_t rows8 = rows / kLanes * kLanes, c8 = c0 + (c1 - c0) / kLanes * kLanes;
    for (int64_t c = c0; c < c8; c += kLanes) {
      for (int64_t t = 0; t < rows8; t += kLanes) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = load8(src + (t + i) * s0 + c);
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
        const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        float* out = dst + (c - c0) * ld + t;
        _mm256_storeu_ps(out + 0 * ld, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_storeu_ps(out + 1 * ld, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_storeu_ps(out + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_storeu_ps(out + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_storeu_ps(out + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_storeu_ps(out + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_storeu_ps(out + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
        _mm256_storeu_ps(out + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
      }
      transpose_scalar<T, float>(src, s0, s1, rows8, rows, c, c + kLanes, dst + (c - c0) * ld, ld);
    }
    transpose_scalar<T, float>(src, s0, s1, 0, rows, c8, c1, dst + (c8 - c0) * ld, ld);
  }

  // flatten: dot_row's loop and both block sizes inlined here, compiled for AVX2.
  __attribute__((flatten)) static void row(const float* dy, const float* xT, int64_t ld, const int32_t* cols,
                                           int64_t count, float* out, const float* zeros) {
    dot_row<Avx2Kernel>(dy, xT, ld, cols, count, out, zeros);
  }
};

#pragma GCC pop_options
#endif  // FASTADAPT_SAMPLED_AVX2

// ---- the chunk loop ------------------------------------------------------------------------------

std::vector<std::string> isas() {
  std::vector<std::string> found;
#if FASTADAPT_SAMPLED_AVX2
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) found.emplace_back("avx2");
#endif
  found.emplace_back("scalar");
  return found;
}

template <typename Kernel, typename T, typename Acc>
void run_blocks(const at::Tensor& dy, const at::Tensor& x, const int32_t* crow, const int32_t* ccol, int64_t T_,
                Acc* values) {
  const int64_t N = x.size(0), in = x.size(1), out = dy.size(1), ld = round_up(T_, kLanes), K = crow[out];
  const T* x_ptr = x.const_data_ptr<T>();
  const T* dy_ptr = dy.const_data_ptr<T>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), ds0 = dy.stride(0), ds1 = dy.stride(1);
  // Token blocks: a split of the chunks fixed by N and T alone (never by the thread count); each
  // block is summed by one task into its own partial (block 0 into values), partials added after
  // in block order.
  const int64_t chunks = (N + T_ - 1) / T_;
  const int64_t wanted = std::clamp<int64_t>(N / kMinBlockTokens, 1, kMaxBlocks);
  const int64_t chunks_per_block = (chunks + wanted - 1) / wanted;
  const int64_t blocks = (chunks + chunks_per_block - 1) / chunks_per_block;
  std::vector<Acc> partials(static_cast<size_t>((blocks - 1) * K), Acc(0));
  // Each task takes the next block until none is left (a task on a core another process holds takes
  // fewer), so parallel_for's split of [0, blocks) only sets the number of tasks.
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, blocks, 1, [&](int64_t, int64_t) {
    std::vector<Acc> xT(static_cast<size_t>(in * ld)), dyT(static_cast<size_t>(out * ld)), zeros(ld, Acc(0));
    for (int64_t b = next_block++; b < blocks; b = next_block++) {
      Acc* sums = b == 0 ? values : partials.data() + (b - 1) * K;
      for (int64_t c = b * chunks_per_block; c < std::min(chunks, (b + 1) * chunks_per_block); ++c) {
        const int64_t t0 = c * T_, rows = std::min(T_, N - t0);
        Kernel::transpose(x_ptr + t0 * xs0, xs0, xs1, rows, 0, in, xT.data(), ld);
        Kernel::transpose(dy_ptr + t0 * ds0, ds0, ds1, rows, 0, out, dyT.data(), ld);
        for (int64_t p = 0; p < out; ++p) {
          const int64_t k0 = crow[p], k1 = crow[p + 1];
          if (k1 > k0) Kernel::row(dyT.data() + p * ld, xT.data(), ld, ccol + k0, k1 - k0, sums + k0, zeros.data());
        }
      }
    }
  });
  if (blocks > 1) {
    at::parallel_for(0, K, kAddGrain, [&](int64_t k0, int64_t k1) {
      for (int64_t b = 1; b < blocks; ++b) {
        const Acc* partial = partials.data() + (b - 1) * K;
        for (int64_t k = k0; k < k1; ++k) values[k] += partial[k];
      }
    });
  }
}

void check_plan(const at::Tensor& crow, const at::Tensor& ccol, int64_t out, int64_t in) {
  TORCH_CHECK_TYPE(crow.scalar_type() == at::kInt && ccol.scalar_type() == at::kInt, "crow and ccol must be int32 ",
                   "(fastadapt.ops.lowrank_shira.shira_plan); got ", crow.scalar_type(), " and ", ccol.scalar_type());
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.size(0) == out + 1 && ccol.dim() == 1, "crow must have shape (",
                    out + 1, ",) for dy's ", out, " columns and ccol (K,); got ", crow.sizes(), " and ", ccol.sizes());
  const int32_t* c = crow.const_data_ptr<int32_t>();
  TORCH_CHECK_VALUE(c[0] == 0 && c[out] == ccol.size(0), "crow must run from 0 to K=", ccol.size(0), "; got ", c[0],
                    " .. ", c[out]);
  for (int64_t p = 0; p < out; ++p)
    TORCH_CHECK_VALUE(c[p] <= c[p + 1], "crow must be non-decreasing; crow[", p, "]=", c[p], " > crow[", p + 1,
                      "]=", c[p + 1]);
  const int32_t* q = ccol.const_data_ptr<int32_t>();
  for (int64_t k = 0; k < ccol.size(0); ++k)
    TORCH_CHECK_VALUE(q[k] >= 0 && q[k] < in, "ccol[", k, "]=", q[k], " is outside x's columns 0..", in - 1);
}

// values (K,) in the accumulation type; chunk_tokens 0 picks T from in; isa "" the best available.
at::Tensor sampled_product(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow_in,
                           const at::Tensor& ccol_in, int64_t chunk_tokens, const std::string& isa) {
  TORCH_CHECK_TYPE(dy.device().is_cpu() && x.device().is_cpu() && crow_in.device().is_cpu() &&
                       ccol_in.device().is_cpu(), "sampled_product takes CPU tensors");
  TORCH_CHECK_VALUE(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0), "dy (N, out) and x (N, in) must be ",
                    "2-D with the same N; got ", dy.sizes(), " and ", x.sizes());
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dy.scalar_type() == dtype, "dy has dtype ", dy.scalar_type(), " but x has ", dtype,
                   "; they must match");
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                   "x has dtype ", dtype, "; sampled_product takes float32, float16, bfloat16 or float64");
  TORCH_CHECK_VALUE(chunk_tokens >= 0, "chunk_tokens=", chunk_tokens, " must be >= 0 (0: chosen from x's width)");
  const std::vector<std::string> available = isas();
  const std::string chosen = isa.empty() ? available.front() : isa;
  TORCH_CHECK_VALUE(std::find(available.begin(), available.end(), chosen) != available.end(), "isa=", isa,
                    " is not available on this CPU; valid choices: ", available);
  const at::Tensor crow = crow_in.contiguous(), ccol = ccol_in.contiguous();
  const int64_t out = dy.size(1), in = x.size(1), N = x.size(0);
  check_plan(crow, ccol, out, in);
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor values = at::zeros({ccol.size(0)}, x.options().dtype(acc));
  if (N == 0 || ccol.size(0) == 0) return values;
  const int64_t T_ = chunk_tokens > 0 ? chunk_tokens : default_chunk_tokens(in, acc == at::kDouble ? 8 : 4);
  const int32_t* crow_ptr = crow.const_data_ptr<int32_t>();
  const int32_t* ccol_ptr = ccol.const_data_ptr<int32_t>();
  const auto run = [&](auto kernel, auto element) {
    using Kernel = decltype(kernel);
    using T = decltype(element);
    using Acc = acc_t<T>;
    run_blocks<Kernel, T, Acc>(dy, x, crow_ptr, ccol_ptr, T_, values.mutable_data_ptr<Acc>());
  };
#if FASTADAPT_SAMPLED_AVX2
  if (chosen == "avx2" && dtype != at::kDouble) {
    if (dtype == at::kFloat) run(Avx2Kernel{}, float{});
    else if (dtype == at::kBFloat16) run(Avx2Kernel{}, c10::BFloat16{});
    else run(Avx2Kernel{}, c10::Half{});
    return values;
  }
#endif
  if (dtype == at::kDouble) run(ScalarKernel<double>{}, double{});
  else if (dtype == at::kFloat) run(ScalarKernel<float>{}, float{});
  else if (dtype == at::kBFloat16) run(ScalarKernel<float>{}, c10::BFloat16{});
  else run(ScalarKernel<float>{}, c10::Half{});
  return values;
}

}  // namespace

// torch.ops.fastadapt_cpu.*: this file's ops (the pybind module of csrc/ belongs to dropout.cpp).
TORCH_LIBRARY(fastadapt_cpu, m) {
  m.def("sampled_product(Tensor dy, Tensor x, Tensor crow, Tensor ccol, int chunk_tokens=0, str isa='') -> Tensor",
        &sampled_product);
  m.def("sampled_product_isas() -> str[]", &isas);
}
