// Philox4x32-10 uniforms exactly as triton.language.random computes them (randint4x, rand4x).
//
// Counter (c0, c1, c2, c3) = (q mod 2^32, q div 2^32, 0, 0) for the int64 offset q; key
// (k0, k1) = (seed mod 2^32, seed div 2^32) for the 64-bit seed.  Ten rounds of
//
//     c0, c1, c2, c3 <- hi(B c2) ^ c1 ^ k0,  lo(B c2),  hi(A c0) ^ c3 ^ k1,  lo(A c0)
//     k0, k1         <- k0 + 0x9E3779B9,  k1 + 0xBB67AE85          (mod 2^32)
//
// with A = 0xD2511F53, B = 0xCD9E8D57 and hi/lo the halves of the 64-bit product.  Each output
// word r becomes a float32 in [0, 1) (triton's uint_to_uniform_float):
//
//     s = bitcast<int32>(r);  s = s < 0 ? ~s : s;  u = float(s) * 4.6566127342e-10f
//
// float(s) rounds to nearest (s < 2^31 needs up to 31 bits), then one float32 product.
//
// Two forms: philox_uniforms_scalar (portable C++, one call at a time; the reference and the
// fallback) and philox_uniforms_simd<S> (S::W calls side by side, S an instruction-set struct
// defined in a csrc/philox_<isa>.cpp translation unit compiled for that instruction set).  Every
// function here is in an anonymous namespace so that each translation unit keeps its own copy
// compiled for its own instruction set (no inline function shared across them).
#pragma once

#include <cstdint>

// The AVX-512 / AVX2 translation units (compiled for their instruction set by #pragma GCC target).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTADAPT_X86_SIMD 1
#else
#define FASTADAPT_X86_SIMD 0
#endif

namespace fastadapt_philox {

constexpr int kRounds = 10;

struct RoundKeys {
  uint32_t k0[kRounds];
  uint32_t k1[kRounds];
};

// u[4 g + c] = uniform c of Philox call q0 + g, for g < n_groups rounded up to a multiple of kGroupsRoundUp
// (u has room for that; the extra calls are computed and ignored).  kGroupsRoundUp is also the
// number of calls the SIMD forms compute side by side.
using UniformsFn = void (*)(int64_t q0, int64_t n_groups, const RoundKeys& keys, float* u);
constexpr int64_t kGroupsRoundUp = 32;

namespace {

constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr float kUniformScale = 4.6566127342e-10f;  // (2^23 - 1) / 2^23 * 2^-31, as triton rounds it

inline RoundKeys round_keys(uint64_t seed) {
  RoundKeys keys;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kRounds; ++r) {
    keys.k0[r] = k0;
    keys.k1[r] = k1;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return keys;
}

inline float uniform_of(uint32_t r) {
  int32_t s = static_cast<int32_t>(r);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * kUniformScale;
}

inline void philox_uniforms_scalar(int64_t q0, int64_t n_groups, const RoundKeys& keys, float* u) {
  for (int64_t g = 0; g < n_groups; ++g) {
    const uint64_t q = static_cast<uint64_t>(q0 + g);
    uint32_t c0 = static_cast<uint32_t>(q), c1 = static_cast<uint32_t>(q >> 32), c2 = 0, c3 = 0;
    for (int r = 0; r < kRounds; ++r) {
      const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
      const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
      c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ keys.k0[r];
      c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ keys.k1[r];
      c1 = static_cast<uint32_t>(pb);
      c3 = static_cast<uint32_t>(pa);
    }
    u[4 * g + 0] = uniform_of(c0);
    u[4 * g + 1] = uniform_of(c1);
    u[4 * g + 2] = uniform_of(c2);
    u[4 * g + 3] = uniform_of(c3);
  }
}

// S provides: type V (S::W uint32 lanes), set1(uint32), load(const uint32_t*), xor3(a, b, c),
// mul_hi_lo(a, c, hi, lo) (32 x 32 -> 64-bit products per lane, split), and
// store_uniforms(c0, c1, c2, c3, float* u) (uniform_of per lane, interleaved u[4 l + c]).
// kChains independent blocks of S::W calls go through the rounds together: one block alone waits
// on the latency of each round's product -> xor chain.
template <class S>
inline void philox_uniforms_simd(int64_t q0, int64_t n_groups, const RoundKeys& keys, float* u) {
  using V = typename S::V;
  constexpr int kChains = kGroupsRoundUp / S::W;
  const V a = S::set1(kRoundA), b = S::set1(kRoundB), zero = S::set1(0);
  for (int64_t g0 = 0; g0 < n_groups; g0 += kGroupsRoundUp) {
    uint32_t lo[kGroupsRoundUp], hi[kGroupsRoundUp];
    for (int l = 0; l < kGroupsRoundUp; ++l) {
      const uint64_t q = static_cast<uint64_t>(q0 + g0 + l);
      lo[l] = static_cast<uint32_t>(q);
      hi[l] = static_cast<uint32_t>(q >> 32);
    }
    V c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    for (int k = 0; k < kChains; ++k) {
      c0[k] = S::load(lo + k * S::W);
      c1[k] = S::load(hi + k * S::W);
      c2[k] = zero;
      c3[k] = zero;
    }
    for (int r = 0; r < kRounds; ++r) {
      const V k0 = S::set1(keys.k0[r]), k1 = S::set1(keys.k1[r]);
      for (int k = 0; k < kChains; ++k) {
        V hb, lb, ha, la;
        S::mul_hi_lo(b, c2[k], hb, lb);
        S::mul_hi_lo(a, c0[k], ha, la);
        c0[k] = S::xor3(hb, c1[k], k0);
        c2[k] = S::xor3(ha, c3[k], k1);
        c1[k] = lb;
        c3[k] = la;
      }
    }
    for (int k = 0; k < kChains; ++k) S::store_uniforms(c0[k], c1[k], c2[k], c3[k], u + 4 * (g0 + k * S::W));
  }
}

}  // namespace
}  // namespace fastadapt_philox
