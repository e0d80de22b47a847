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

}  // namespace

TORCH_LIBRARY(splitglm_int4, m) {
  m.def("int4_rows(Tensor x, Tensor packed, Tensor scales_zeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitglm_int4, CPU, m) {
  m.impl("int4_rows", &int4_rows);
}
