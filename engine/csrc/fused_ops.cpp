// The elementwise pieces of a Llama-family decoder layer, one call each instead of 5-15 torch ops.
//
// Why: at decode sizes (8 rows of 1024) every torch op costs its dispatch (~5-15 us on these 2
// cores) for a few microseconds of arithmetic, and a layer runs ~45 of them between its GEMMs
// (RMSNorm alone is 6: upcast, pow, mean, add, rsqrt, two muls, downcast). These kernels compute
// the same values in the same order of roundings as the transformers modules they stand in for:
//   rms_norm:      y = w * round(x * rsqrt(mean(x^2) + eps))      (sums in float32)
//   add_rms_norm:  h = round(r + x); y = rms_norm(h)              (the residual add, then the norm)
//   rotary:        x1' = round(round(x1 c1) - round(x2 s1)), x2' = round(round(x2 c2) + round(x1 s2))
//   silu_mul:      y = round(round(silu(g)) * u)
// where round() is the model dtype's rounding (none for float32). Only the order of the sum of
// squares and the exp inside silu can differ from torch's, by an ulp of float32 before rounding.
//
// dtype codes as engine/cpu_kernels.py: 0 float32, 1 bfloat16. Anything else returns -1 and the
// caller keeps the torch ops. Threads split rows only where a call has enough work to pay for it.
// Products rounded before the sums, as torch's separate ops do (no fused multiply-adds here).
#pragma GCC optimize("fp-contract=off")
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>
#include "vec_exp.h"

namespace {

inline float bf16_to_f(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f_to_bf16(float f) {  // round to nearest even, NaN kept quiet (as torch)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

struct F32 {
  using T = float;
  static inline float load(const float* p, long i) { return p[i]; }
  static inline void store(float* p, long i, float v) { p[i] = v; }
  static inline float round(float v) { return v; }
};

struct BF16 {
  using T = uint16_t;
  static inline float load(const uint16_t* p, long i) { return bf16_to_f(p[i]); }
  static inline void store(uint16_t* p, long i, float v) { p[i] = f_to_bf16(v); }
  static inline float round(float v) { return bf16_to_f(f_to_bf16(v)); }
};

// Below this many elements a call runs on one thread: an OpenMP fork costs more than the work.
constexpr long PARALLEL_MIN = 1L << 16;

inline int threads_for(long elems, int nthreads) {
  return elems >= PARALLEL_MIN && nthreads > 1 ? nthreads : 1;
}

template <class P>
inline void norm_row(const float* h, const typename P::T* w, typename P::T* y, long dim, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (long i = 0; i < dim; ++i) ss += h[i] * h[i];
  const float r = 1.0f / std::sqrt(ss / (float)dim + eps);
#pragma omp simd
  for (long i = 0; i < dim; ++i) P::store(y, i, P::load(w, i) * P::round(h[i] * r));
}

template <class P>
void rms_norm_impl(const typename P::T* x, long ldx, const typename P::T* r, long ldr, typename P::T* hout,
                   long ldh, const typename P::T* w, typename P::T* y, long ldy, long rows, long dim, float eps,
                   int nthreads) {
#pragma omp parallel num_threads(threads_for(rows * dim, nthreads))
  {
    float* h = new float[dim];
#pragma omp for schedule(static)
    for (long m = 0; m < rows; ++m) {
      const typename P::T* xm = x + m * ldx;
      if (r) {  // the residual add first: h = round(r + x), kept for the next residual
        const typename P::T* rm = r + m * ldr;
        typename P::T* hm = hout + m * ldh;
#pragma omp simd
        for (long i = 0; i < dim; ++i) {
          h[i] = P::round(P::load(rm, i) + P::load(xm, i));
          P::store(hm, i, h[i]);
        }
      } else {
#pragma omp simd
        for (long i = 0; i < dim; ++i) h[i] = P::load(xm, i);
      }
      norm_row<P>(h, w, y + m * ldy, dim, eps);
    }
    delete[] h;
  }
}

template <class P>
void rotary_impl(typename P::T* x, long ldx, int heads, int D, const typename P::T* cs, long ldc,
                 const typename P::T* sn, long lds, long rows, int nthreads) {
  const int half = D / 2;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * heads * D, nthreads))
  for (long m = 0; m < rows; ++m) {
    const typename P::T* c = cs + m * ldc;
    const typename P::T* s = sn + m * lds;
    for (int h = 0; h < heads; ++h) {
      typename P::T* v = x + m * ldx + (long)h * D;
#pragma omp simd
      for (int i = 0; i < half; ++i) {
        const float x1 = P::load(v, i), x2 = P::load(v, i + half);
        const float a1 = P::round(x1 * P::load(c, i)), b1 = P::round(-x2 * P::load(s, i));
        const float a2 = P::round(x2 * P::load(c, i + half)), b2 = P::round(x1 * P::load(s, i + half));
        P::store(v, i, a1 + b1);
        P::store(v, i + half, a2 + b2);
      }
    }
  }
}

#if defined(__AVX512F__)
// e^x with x clamped to [-87, 88].
inline __m512 exp_ps(__m512 x) {
  return exp512_in_range(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f)));
}

inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 round16(__m512 v) {  // float32 -> nearest-even bfloat16 -> float32 (NaN-free inputs)
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

inline void store16(uint16_t* p, __m512 v) {  // v already holds bfloat16 values
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}
#endif

void silu_mul_bf16(const uint16_t* gate, long ldg, const uint16_t* up, long ldu, long inter, uint16_t* y, long ldy,
                   long rows, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * inter, nthreads))
  for (long m = 0; m < rows; ++m) {
    const uint16_t* g = gate + m * ldg;
    const uint16_t* u = up + m * ldu;
    uint16_t* ym = y + m * ldy;
    long i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= inter; i += 16) {
      const __m512 gv = load16(g + i);
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
      const __m512 s = round16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
      store16(ym + i, round16(_mm512_mul_ps(s, load16(u + i))));
    }
#endif
    for (; i < inter; ++i) {
      const float gv = bf16_to_f(g[i]);
      const float s = BF16::round(gv / (1.0f + std::exp(-gv)));
      ym[i] = f_to_bf16(s * bf16_to_f(u[i]));
    }
  }
}

void silu_mul_f32(const float* gate, long ldg, const float* up, long ldu, long inter, float* y, long ldy, long rows,
                  int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * inter, nthreads))
  for (long m = 0; m < rows; ++m) {
    const float* g = gate + m * ldg;
    const float* u = up + m * ldu;
    float* ym = y + m * ldy;
    for (long i = 0; i < inter; ++i) ym[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

}  // namespace

extern "C" {

// y[m] = rms_norm(x[m]) * w, or with r given: h[m] = r[m] + x[m] (rounded, stored; h may be r),
// y[m] = rms_norm(h[m]) * w.
int fused_rms_norm(int dtype, const void* x, long ldx, const void* r, long ldr, void* h, long ldh, const void* w,
                   void* y, long ldy, long rows, long dim, float eps, int nthreads) {
  if (dtype == 0)
    rms_norm_impl<F32>((const float*)x, ldx, (const float*)r, ldr, (float*)h, ldh, (const float*)w, (float*)y,
                       ldy, rows, dim, eps, nthreads);
  else if (dtype == 1)
    rms_norm_impl<BF16>((const uint16_t*)x, ldx, (const uint16_t*)r, ldr, (uint16_t*)h, ldh, (const uint16_t*)w,
                        (uint16_t*)y, ldy, rows, dim, eps, nthreads);
  else
    return -1;
  return 0;
}

// In place on x[rows, heads, D] (row stride ldx, heads contiguous), cos/sin [rows, D].
int fused_rotary(int dtype, void* x, long ldx, int heads, int D, const void* cs, long ldc, const void* sn, long lds,
                 long rows, int nthreads) {
  if (D % 2) return -1;
  if (dtype == 0)
    rotary_impl<F32>((float*)x, ldx, heads, D, (const float*)cs, ldc, (const float*)sn, lds, rows, nthreads);
  else if (dtype == 1)
    rotary_impl<BF16>((uint16_t*)x, ldx, heads, D, (const uint16_t*)cs, ldc, (const uint16_t*)sn, lds, rows,
                      nthreads);
  else
    return -1;
  return 0;
}

// y[m] = silu(gate[m]) * up[m], rows of ``inter`` values.
int fused_silu_mul(int dtype, const void* gate, long ldg, const void* up, long ldu, long inter, void* y, long ldy,
                   long rows, int nthreads) {
  if (dtype == 0)
    silu_mul_f32((const float*)gate, ldg, (const float*)up, ldu, inter, (float*)y, ldy, rows, nthreads);
  else if (dtype == 1)
    silu_mul_bf16((const uint16_t*)gate, ldg, (const uint16_t*)up, ldu, inter, (uint16_t*)y, ldy, rows, nthreads);
  else
    return -1;
  return 0;
}

}  // extern "C"
