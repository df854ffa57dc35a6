// philox_uniforms for AVX-512F: 16 Philox calls per block (csrc/philox.h has the math).
// The whole translation unit is compiled for AVX-512F; dropout.cpp calls it only on CPUs that have it.
// Same condition as FASTADAPT_X86_SIMD in philox.h, which must be included after the pragma so that
// its template compiles for this instruction set.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f")
#include <immintrin.h>

#include "philox.h"

namespace fastadapt_philox {
namespace {

struct Avx512 {
  using V = __m512i;
  static constexpr int W = 16;
  static V set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  static V load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static void mul_hi_lo(V a, V c, V& hi, V& lo) {  // a: one constant in every lane
    const V even = _mm512_mul_epu32(a, c), odd = _mm512_mul_epu32(a, _mm512_srli_epi64(c, 32));
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  }
  static __m512 uniform(V c) {  // s < 0 ? ~s : s is s ^ (s >> 31) (arithmetic shift)
    const V s = _mm512_xor_si512(c, _mm512_srai_epi32(c, 31));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(kUniformScale));
  }
  static void store_uniforms(V c0, V c1, V c2, V c3, float* u) {
    // pairs[m][2 i + b] = f_b[8 m + i] (b = 0, 1 from f0, f1; the same for f2, f3), then
    // u[16 k + 4 i + c] = f_c[4 k + i] from the pairs of m = k / 2.
    const __m512 f0 = uniform(c0), f1 = uniform(c1), f2 = uniform(c2), f3 = uniform(c3);
    const __m512i pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i pair_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i quad_lo = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
    const __m512i quad_hi = _mm512_setr_epi32(8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
    const __m512 a0 = _mm512_permutex2var_ps(f0, pair_lo, f1), a1 = _mm512_permutex2var_ps(f0, pair_hi, f1);
    const __m512 b0 = _mm512_permutex2var_ps(f2, pair_lo, f3), b1 = _mm512_permutex2var_ps(f2, pair_hi, f3);
    _mm512_storeu_ps(u, _mm512_permutex2var_ps(a0, quad_lo, b0));
    _mm512_storeu_ps(u + 16, _mm512_permutex2var_ps(a0, quad_hi, b0));
    _mm512_storeu_ps(u + 32, _mm512_permutex2var_ps(a1, quad_lo, b1));
    _mm512_storeu_ps(u + 48, _mm512_permutex2var_ps(a1, quad_hi, b1));
  }
};

}  // namespace

void philox_uniforms_avx512(int64_t q0, int64_t n_groups, const RoundKeys& keys, float* u) {
  philox_uniforms_simd<Avx512>(q0, n_groups, keys, u);
}

}  // namespace fastadapt_philox
#endif
