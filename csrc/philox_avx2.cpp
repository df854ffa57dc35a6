// philox_uniforms for AVX2: 8 Philox calls per block (csrc/philox.h has the math).
// The whole translation unit is compiled for AVX2; dropout.cpp calls it only on CPUs that have it.
// Same condition as FASTADAPT_X86_SIMD in philox.h, which must be included after the pragma so that
// its template compiles for this instruction set.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2")
#include <immintrin.h>

#include "philox.h"

namespace fastadapt_philox {
namespace {

struct Avx2 {
  using V = __m256i;
  static constexpr int W = 8;
  static V set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static V load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static V xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static void mul_hi_lo(V a, V c, V& hi, V& lo) {  // a: one constant in every lane
    const V even = _mm256_mul_epu32(a, c), odd = _mm256_mul_epu32(a, _mm256_srli_epi64(c, 32));
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }
  static __m256 uniform(V c) {  // s < 0 ? ~s : s is s ^ (s >> 31) (arithmetic shift)
    const V s = _mm256_xor_si256(c, _mm256_srai_epi32(c, 31));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(kUniformScale));
  }
  static void store_uniforms(V c0, V c1, V c2, V c3, float* u) {
    // A 4 x 8 transpose: t_i holds groups i (low 128 bits) and 4 + i (high), lanes c = 0..3.
    const __m256 f0 = uniform(c0), f1 = uniform(c1), f2 = uniform(c2), f3 = uniform(c3);
    const __m256d lo01 = _mm256_castps_pd(_mm256_unpacklo_ps(f0, f1)), hi01 = _mm256_castps_pd(_mm256_unpackhi_ps(f0, f1));
    const __m256d lo23 = _mm256_castps_pd(_mm256_unpacklo_ps(f2, f3)), hi23 = _mm256_castps_pd(_mm256_unpackhi_ps(f2, f3));
    const __m256 t0 = _mm256_castpd_ps(_mm256_unpacklo_pd(lo01, lo23)), t1 = _mm256_castpd_ps(_mm256_unpackhi_pd(lo01, lo23));
    const __m256 t2 = _mm256_castpd_ps(_mm256_unpacklo_pd(hi01, hi23)), t3 = _mm256_castpd_ps(_mm256_unpackhi_pd(hi01, hi23));
    _mm256_storeu_ps(u, _mm256_permute2f128_ps(t0, t1, 0x20));
    _mm256_storeu_ps(u + 8, _mm256_permute2f128_ps(t2, t3, 0x20));
    _mm256_storeu_ps(u + 16, _mm256_permute2f128_ps(t0, t1, 0x31));
    _mm256_storeu_ps(u + 24, _mm256_permute2f128_ps(t2, t3, 0x31));
  }
};

}  // namespace

void philox_uniforms_avx2(int64_t q0, int64_t n_groups, const RoundKeys& keys, float* u) {
  philox_uniforms_simd<Avx2>(q0, n_groups, keys, u);
}

}  // namespace fastadapt_philox
#endif
