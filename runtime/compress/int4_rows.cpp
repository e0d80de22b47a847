// A few rows through int4 group-32 weights on AVX-512 BF16: splitglm::int4_rows.
//
// y (M, N) fp32 = x (M, K) . W^T, where W[n, k] = (code[n, k] - 8) * scale[n, g] + zero[n, g], g = k / 32.
// x is rounded to bf16 (as the eager kernel does); codes minus 8 are exact in bf16, so each product is
// exact and the sums are fp32 (vdpbf16ps): sum_g scale * sum_k (code - 8) x + zero * sum_k x.
//
// Layouts (made by runtime/compress/int4_rows.py, ``pack_int4_rows``):
//   packed (N/16, K/4, 32) uint8: for 16 output rows and 4 inputs k0..k0+3, byte 2i+j holds row i's code of
//     input k0+j in its low nibble and of k0+2+j in its high nibble;
//   scales_zeros (N/16, K/32, 2, 16) bf16: the 16 rows' scales, then their zeros, per group.
// Output blocks of 16 rows are split over ATen's threads.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

namespace {

constexpr int kGroup = 32;
constexpr int kRowsMax = 4;      // rows sharing one unpacking of the weights
constexpr int kPrefetch = 2048;  // bytes read ahead in the packed weights (a prefetch past the end never faults)

inline __m512 bf16x16_to_fp32(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Rows [0, MB) of x (as bf16 pairs and group sums) through one block of 16 output rows.
template <int MB>
void block_rows(const uint8_t* w, const c10::BFloat16* sz, const uint32_t* xpairs, const float* xsums,
                int64_t K, float* out, int64_t ldo) {
  const int64_t G = K / kGroup;
  // bf16 of code - 8 for codes 0..15, twice (vpermw indexes 32 words).
  alignas(64) static const uint16_t lut_words[32] = {
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000,
      0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040,
      0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};
  const __m512i lut = _mm512_load_si512(lut_words);
  const __m512i low4 = _mm512_set1_epi16(0x000F);
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 gacc[MB];
    for (int m = 0; m < MB; ++m) gacc[m] = _mm512_setzero_ps();
    const uint8_t* wg = w + g * (kGroup / 4) * 32;
    const int64_t pair0 = g * (kGroup / 2);
    for (int line = 0; line < (kGroup / 4) * 32; line += 64)  // this group's 256 bytes, kPrefetch ahead
      _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetch + line), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int q = 0; q < kGroup / 4; ++q) {
      __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + q * 32)));
      __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(words, low4), lut);
      __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), lut);
      for (int m = 0; m < MB; ++m) {
        const uint32_t* xp = xpairs + m * (K / 2) + pair0 + 2 * q;
        gacc[m] = _mm512_dpbf16_ps(gacc[m], lo, (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[0])));
        gacc[m] = _mm512_dpbf16_ps(gacc[m], hi, (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[1])));
      }
    }
    const __m512 scale = bf16x16_to_fp32(sz + g * 32);
    const __m512 zero = bf16x16_to_fp32(sz + g * 32 + 16);
    for (int m = 0; m < MB; ++m) {
      acc[m] = _mm512_fmadd_ps(scale, gacc[m], acc[m]);
      acc[m] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsums[m * G + g]), acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(out + m * ldo, acc[m]);
}

// One row rounded to bf16 as c10::BFloat16 rounds (nearest even, NaN to 0x7FC0), and its sums per group of 32.
void round_row(const float* x, int64_t K, uint16_t* xb, float* xs) {
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), qnan = _mm512_set1_epi32(0x7FC00000);
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m512 sum = _mm512_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_loadu_ps(x + g * kGroup + h * 16);
      const __m512i u = _mm512_castps_si512(v);
      __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
      r = _mm512_mask_mov_epi32(_mm512_and_si512(r, high), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(r));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + g * kGroup + h * 16),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
    xs[g] = _mm512_reduce_add_ps(sum);
  }
}

void block_any(int rows, const uint8_t* w, const c10::BFloat16* sz, const uint32_t* xpairs, const float* xsums,
               int64_t K, float* out, int64_t ldo) {
  switch (rows) {
    case 1: return block_rows<1>(w, sz, xpairs, xsums, K, out, ldo);
    case 2: return block_rows<2>(w, sz, xpairs, xsums, K, out, ldo);
    case 3: return block_rows<3>(w, sz, xpairs, xsums, K, out, ldo);
    default: return block_rows<4>(w, sz, xpairs, xsums, K, out, ldo);
  }
}

at::Tensor int4_rows(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int4_rows: x must be (M, K) float32");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 32 && packed.scalar_type() == at::kByte,
              "int4_rows: packed must be (N/16, K/4, 32) uint8");
  const int64_t M = x.size(0), K = x.size(1), NB = packed.size(0), G = K / kGroup;
  TORCH_CHECK(K % kGroup == 0 && packed.size(1) * 4 == K, "int4_rows: K must be packed's K and a multiple of 32");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.numel() == NB * G * 32,
              "int4_rows: scales_zeros must be (N/16, K/32, 2, 16) bf16");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = packed.contiguous(), szc = scales_zeros.contiguous();
  at::Tensor out = at::empty({M, NB * 16}, x.options());
  // The rows as bf16 (round to nearest even, as Tensor.to(torch.bfloat16)) and their sums per group.
  std::vector<uint16_t> xb(M * K);
  std::vector<float> xs(M * G);
  for (int64_t m = 0; m < M; ++m) round_row(xc.data_ptr<float>() + m * K, K, xb.data() + m * K, xs.data() + m * G);
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(xb.data());
  const uint8_t* w = wc.data_ptr<uint8_t>();
  const c10::BFloat16* sz = szc.data_ptr<c10::BFloat16>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      for (int64_t m = 0; m < M; m += kRowsMax) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowsMax, M - m));
        block_any(rows, w + nb * (K / 4) * 32, sz + nb * G * 32, pairs + m * (K / 2), xs.data() + m * G, K,
                  o + m * NB * 16 + nb * 16, NB * 16);
      }
    }
  });
  return out;
}

// ATen's CPU int4 packing (_convert_weight_to_int4pack_for_cpu of N % 64 == 0 outputs) widened to two bf16
// halves of W^T, stacked: (2K, N), rows [0, K) hi = bf16(w), rows [K, 2K) lo = bf16(w - hi), where
// w[n, k] = (code - 8) * scale + zero in fp32 (nearest even). hi + lo holds w to ~2^-17, so [x, x] (M, 2K)
// times them in one bf16 product with fp32 sums (oneDNN: AMX or AVX-512 BF16) gives the bf16-rounded row's
// product with the stored weights, as the int4 kernel does, several times faster for a prompt's many rows.
//   packed: for 64 outputs n0.. and input k, 32 bytes: byte j holds output n0 + j's code in its low nibble,
//     n0 + 32 + j's in its high one; blocks of 64 outputs one after another, inputs inside them.
//   scales_zeros (K/gs, N, 2) bf16.
at::Tensor int4_widen_t(const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t N, int64_t K, int64_t gs) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() * 2 == N * K, "int4_widen_t: packed must hold N*K/2 bytes");
  TORCH_CHECK(N % 64 == 0 && gs > 0 && K % gs == 0, "int4_widen_t: N must be a multiple of 64 and K of the group");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.numel() == (K / gs) * N * 2,
              "int4_widen_t: scales_zeros must be (K/gs, N, 2) bf16");
  const at::Tensor wc = packed.contiguous(), szc = scales_zeros.contiguous();
  at::Tensor out = at::empty({2 * K, N}, packed.options().dtype(at::kBFloat16));
  const uint8_t* w = wc.data_ptr<uint8_t>();
  const uint32_t* sz = reinterpret_cast<const uint32_t*>(szc.data_ptr<c10::BFloat16>());  // (scale | zero << 16)
  __m256bh* o = reinterpret_cast<__m256bh*>(out.data_ptr<c10::BFloat16>());
  const int64_t NB = N / 64, G = K / gs;
  at::parallel_for(0, NB * G, 1, [&](int64_t begin, int64_t end) {
    const __m512i low4 = _mm512_set1_epi32(0xF), eight = _mm512_set1_epi32(8);
    const __m512i high16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t u = begin; u < end; ++u) {
      const int64_t nb = u / G, g = u % G;
      __m512 scale[4], zero[4];
      for (int v = 0; v < 4; ++v) {
        const __m512i words = _mm512_loadu_si512(sz + g * N + nb * 64 + v * 16);
        scale[v] = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
        zero[v] = _mm512_castsi512_ps(_mm512_and_si512(words, high16));
      }
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
        const uint8_t* b = w + (nb * K + k) * 32;
        const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
        const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
        const __m512i codes[4] = {_mm512_and_si512(b0, low4), _mm512_and_si512(b1, low4), _mm512_srli_epi32(b0, 4),
                                  _mm512_srli_epi32(b1, 4)};
        __m256bh* hi_row = o + (k * N + nb * 64) / 16;
        __m256bh* lo_row = o + ((K + k) * N + nb * 64) / 16;
        for (int v = 0; v < 4; ++v) {
          const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(codes[v], eight));
          const __m512 wv = _mm512_add_ps(_mm512_mul_ps(q, scale[v]), zero[v]);
          const __m256bh hi = _mm512_cvtneps_pbh(wv);
          const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)hi), 16));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi_row + v), (__m256i)hi);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo_row + v), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(wv, back)));
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(splitglm_int4, m) {
  m.def("int4_rows(Tensor x, Tensor packed, Tensor scales_zeros) -> Tensor");
  m.def("int4_widen_t(Tensor packed, Tensor scales_zeros, int n, int k, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitglm_int4, CPU, m) {
  m.impl("int4_rows", &int4_rows);
  m.impl("int4_widen_t", &int4_widen_t);
}
