// Paged decode attention for CPUs: one query token per sequence, K/V read in place from the
// block-paged cache (no gather copy), float32 math with an online softmax, OpenMP over
// sequences (split into KV-head ranges when there are too few sequences for the threads). Compiled at first use by engine/cpu_kernels.py with the machine's g++
// (-O3 -march=native) and called through ctypes, which releases the GIL for the call.
//
// Cache layout (engine/model_runner.py): kv[slot][2 (k, v)][kv_heads][head_dim]; slot =
// block_table[pos / block_size] * block_size + pos % block_size.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include "vec_exp.h"
#define HAVE_AVX512_BF16 1
#endif

namespace {

inline float load(const float* p) { return *p; }
inline float load(const _Float16* p) { return (float)*p; }
inline float load(const uint16_t* p) {
  uint32_t bits = (uint32_t)*p << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void store(float* p, float v) { *p = v; }
inline void store(_Float16* p, float v) { *p = (_Float16)v; }
inline void store(uint16_t* p, float v) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) { *p = 0x7fc0; return; }  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *p = (uint16_t)(bits >> 16);
}

constexpr int CHUNK = 32;   // positions scored before each softmax rescale
constexpr int MAX_G = 16;   // query heads per KV head
constexpr int MAX_D = 256;  // head_dim

// Softmax state of the G query heads that share one KV head.
struct HeadState {
  float q[MAX_G][MAX_D];
  float acc[MAX_G][MAX_D];
  float m[MAX_G], l[MAX_G];
};

// One sequence, KV heads [h0, h1). Positions are walked once, in chunks; each chunk's slots are
// first read front to back (K and V of the range's heads, contiguous in a slot) into float32
// buffers, then every head attends over the buffers. Reading head by head instead (2 KiB stride
// between positions, a new page every other read) ran at 3.4 GB/s per core.
template <typename T, int DC>
void attend_seq(const T* q, long q_sh, const T* kv, const int32_t* table, int ctx, T* out, long out_sh,
                int Hkv, int h0, int h1, int G, int D_rt, int bs, float scale, int window,
                HeadState* st, float* kbuf, float* vbuf) {
  const int D = DC > 0 ? DC : D_rt;
  const int nh = h1 - h0;
  for (int h = h0; h < h1; ++h) {
    HeadState& S = st[h - h0];
    for (int g = 0; g < G; ++g) {
      const T* qh = q + (long)(h * G + g) * q_sh;
      for (int d = 0; d < D; ++d) { S.q[g][d] = load(qh + d) * scale; S.acc[g][d] = 0.f; }
      S.m[g] = -FLT_MAX;
      S.l[g] = 0.f;
    }
  }
  const long slot_stride = 2L * Hkv * D;  // elements per slot (k and v of every KV head)
  const int start = (window > 0 && ctx > window) ? ctx - window : 0;
  float s[MAX_G][CHUNK];
  for (int p0 = start; p0 < ctx; p0 += CHUNK) {
    const int n = (ctx - p0) < CHUNK ? (ctx - p0) : CHUNK;
    for (int i = 0; i < n; ++i) {
      const int p = p0 + i;
      const T* slot = kv + ((long)table[p / bs] * bs + p % bs) * slot_stride;
      for (int j = 0; j < nh; ++j) {
        const T* k = slot + (long)(h0 + j) * D;
        const T* v = slot + (long)(Hkv + h0 + j) * D;
        float* kb = kbuf + ((long)j * CHUNK + i) * D;
        float* vb = vbuf + ((long)j * CHUNK + i) * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) kb[d] = load(k + d);
#pragma omp simd
        for (int d = 0; d < D; ++d) vb[d] = load(v + d);
      }
    }
    for (int j = 0; j < nh; ++j) {
      HeadState& S = st[j];
      const float* kb = kbuf + (long)j * CHUNK * D;
      const float* vb = vbuf + (long)j * CHUNK * D;
      for (int g = 0; g < G; ++g) {
        float cmax = -FLT_MAX;
        for (int i = 0; i < n; ++i) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int d = 0; d < D; ++d) dot += S.q[g][d] * kb[i * D + d];
          s[g][i] = dot;
          cmax = dot > cmax ? dot : cmax;
        }
        const float mnew = cmax > S.m[g] ? cmax : S.m[g];
        const float corr = std::exp(S.m[g] - mnew);  // 0 on the first chunk (m = -FLT_MAX)
        S.l[g] *= corr;
#pragma omp simd
        for (int d = 0; d < D; ++d) S.acc[g][d] *= corr;
        float lsum = 0.f;
        for (int i = 0; i < n; ++i) {
          const float w = std::exp(s[g][i] - mnew);
          s[g][i] = w;
          lsum += w;
        }
        S.l[g] += lsum;
        S.m[g] = mnew;
        for (int i = 0; i < n; ++i) {
          const float w = s[g][i];
#pragma omp simd
          for (int d = 0; d < D; ++d) S.acc[g][d] += w * vb[i * D + d];
        }
      }
    }
  }
  for (int h = h0; h < h1; ++h) {
    HeadState& S = st[h - h0];
    for (int g = 0; g < G; ++g) {
      T* oh = out + (long)(h * G + g) * out_sh;
      const float inv = S.l[g] > 0.f ? 1.f / S.l[g] : 0.f;
      for (int d = 0; d < D; ++d) store(oh + d, S.acc[g][d] * inv);
    }
  }
}

#ifdef HAVE_AVX512_BF16

// e^x for x <= 0 (softmax weights); below -87 the result is 0.
inline __m512 exp_neg(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(~tiny, exp512_in_range(_mm512_max_ps(x, lo)));
}

inline __m512 bf16x16_to_ps(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The bfloat16 path for head_dim = 32 * NW on CPUs with AVX512-BF16: q.k with vdpbf16ps straight
// from the cache (bfloat16 products are exact in float32; sums in float32), softmax weights 16
// positions at a time with a vectorised exp, V accumulated in float32. Per chunk of 16 positions:
// the scores of every head, slot by slot (each slot's K of all heads is contiguous, and its V is
// prefetched meanwhile), then the weights, then V head by head from cache lines already fetched.
// The next chunk's slots are prefetched while this one is computed. Walking head by head through
// the slots instead (2 KiB stride) reached 11 GB/s from DRAM here; this order ~25.
template <int NW>
void attend_seq_bf16(const uint16_t* q, long q_sh, const uint16_t* kv, const int32_t* table, int ctx,
                     uint16_t* out, long out_sh, int Hkv, int h0, int h1, int G, int bs, float scale,
                     int window, float* acc, float* sc, float* m, float* l) {
  constexpr int D = 32 * NW;
  constexpr int C = 16;
  const int nh = h1 - h0;
  const long slot_stride = 2L * Hkv * D;
  const int start = (window > 0 && ctx > window) ? ctx - window : 0;
  for (int j = 0; j < nh * G; ++j) {
    m[j] = -FLT_MAX;
    l[j] = 0.f;
  }
  for (long j = 0; j < (long)nh * G * D; ++j) acc[j] = 0.f;
  auto slot_of = [&](int p) { return kv + ((long)table[p / bs] * bs + p % bs) * slot_stride; };
  auto prefetch_slot = [&](const uint16_t* sl) {  // this range's K and V lines of one slot
    const char* k = reinterpret_cast<const char*>(sl + (long)h0 * D);
    const char* v = reinterpret_cast<const char*>(sl + (long)(Hkv + h0) * D);
    for (long o = 0; o < (long)nh * D * 2; o += 64) {
      _mm_prefetch(k + o, _MM_HINT_T0);
      _mm_prefetch(v + o, _MM_HINT_T0);
    }
  };
  for (int i = start; i < ctx && i < start + C; ++i) prefetch_slot(slot_of(i));
  for (int p0 = start; p0 < ctx; p0 += C) {
    const int n = (ctx - p0) < C ? (ctx - p0) : C;
    const uint16_t* slots[C];
    for (int i = 0; i < n; ++i) slots[i] = slot_of(p0 + i);
    for (int i = p0 + C; i < ctx && i < p0 + 2 * C; ++i) prefetch_slot(slot_of(i));
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < nh; ++j) {
        const uint16_t* k = slots[i] + (long)(h0 + j) * D;
        __m512i kw[NW];
        for (int w = 0; w < NW; ++w) kw[w] = _mm512_loadu_si512(k + 32 * w);
        for (int g = 0; g < G; ++g) {
          const uint16_t* qh = q + (long)((h0 + j) * G + g) * q_sh;
          __m512 a = _mm512_setzero_ps();
          for (int w = 0; w < NW; ++w)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qh + 32 * w), (__m512bh)kw[w]);
          sc[((long)j * G + g) * C + i] = _mm512_reduce_add_ps(a) * scale;
        }
      }
    }
    const __mmask16 valid = (__mmask16)((1u << n) - 1u);
    for (int jg = 0; jg < nh * G; ++jg) {
      float* s_ = sc + (long)jg * C;
      const __m512 s = _mm512_mask_loadu_ps(_mm512_set1_ps(-FLT_MAX), valid, s_);
      const float cmax = _mm512_reduce_max_ps(s);
      const float mnew = cmax > m[jg] ? cmax : m[jg];
      const float corr = std::exp(m[jg] - mnew);
      const __m512 w = _mm512_maskz_mov_ps(valid, exp_neg(_mm512_sub_ps(s, _mm512_set1_ps(mnew))));
      l[jg] = l[jg] * corr + _mm512_reduce_add_ps(w);
      m[jg] = mnew;
      _mm512_storeu_ps(s_, w);
      if (corr != 1.f) {
        const __m512 c = _mm512_set1_ps(corr);
        float* a = acc + (long)jg * D;
        for (int d = 0; d < D; d += 16) _mm512_storeu_ps(a + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), c));
      }
    }
    for (int j = 0; j < nh; ++j) {
      for (int g0 = 0; g0 < G; g0 += 2) {  // two query heads' accumulators in registers at a time
        const bool two = g0 + 1 < G;
        float* acc0 = acc + ((long)j * G + g0) * D;
        float* acc1 = two ? acc0 + D : acc0;
        const float* w0p = sc + ((long)j * G + g0) * C;
        const float* w1p = two ? w0p + C : w0p;
        __m512 a0[2 * NW], a1[2 * NW];
        for (int v = 0; v < 2 * NW; ++v) {
          a0[v] = _mm512_loadu_ps(acc0 + 16 * v);
          a1[v] = _mm512_loadu_ps(acc1 + 16 * v);
        }
        for (int i = 0; i < n; ++i) {
          const uint16_t* vp = slots[i] + (long)(Hkv + h0 + j) * D;
          const __m512 w0 = _mm512_set1_ps(w0p[i]);
          const __m512 w1 = _mm512_set1_ps(two ? w1p[i] : 0.f);
          for (int v = 0; v < 2 * NW; ++v) {
            const __m512 vv = bf16x16_to_ps(vp + 16 * v);
            a0[v] = _mm512_fmadd_ps(w0, vv, a0[v]);
            a1[v] = _mm512_fmadd_ps(w1, vv, a1[v]);
          }
        }
        for (int v = 0; v < 2 * NW; ++v) {
          _mm512_storeu_ps(acc0 + 16 * v, a0[v]);
          if (two) _mm512_storeu_ps(acc1 + 16 * v, a1[v]);
        }
      }
    }
  }
  for (int j = 0; j < nh; ++j) {
    for (int g = 0; g < G; ++g) {
      const long jg = (long)j * G + g;
      uint16_t* oh = out + (long)((h0 + j) * G + g) * out_sh;
      const __m512 inv = _mm512_set1_ps(l[jg] > 0.f ? 1.f / l[jg] : 0.f);
      for (int d = 0; d < D; d += 16) {
        const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + jg * D + d), inv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(oh + d), (__m256i)o);
      }
    }
  }
}
#endif

template <typename T, int DC>
void run(const void* q_, long q_sb, long q_sh, const void* kv_, const int32_t* tables, int max_blocks,
         const int32_t* ctx_lens, void* out_, long out_sb, long out_sh, int B, int H, int Hkv, int D,
         int bs, float scale, int window, int nthreads) {
  const T* q = static_cast<const T*>(q_);
  const T* kv = static_cast<const T*>(kv_);
  T* out = static_cast<T*>(out_);
  const int G = H / Hkv;
  // Whole sequences per work item when there are enough of them to keep every thread busy;
  // otherwise each sequence's KV heads are split into parts.
  int parts = 1;
  while (parts < Hkv && (long)B * parts < 4L * nthreads) parts *= 2;
  if (parts > Hkv) parts = Hkv;
  const int per = (Hkv + parts - 1) / parts;
#ifdef HAVE_AVX512_BF16
  constexpr bool bf16_path = std::is_same_v<T, uint16_t> && (DC == 64 || DC == 128);
#else
  constexpr bool bf16_path = false;
#endif
  // Each thread allocates only the scratch its path uses (HeadState is 32 KiB a head, zeroed).
  const size_t gen = bf16_path ? 0 : (size_t)per, fast = bf16_path ? (size_t)per : 0;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<HeadState> st(gen);
    std::vector<float> kbuf(gen * CHUNK * D), vbuf(gen * CHUNK * D);
    // the bfloat16 path's per-head state: accumulators, a chunk's scores, running max and sum
    std::vector<float> acc(fast * G * D), sc(fast * G * 16), mx(fast * G), sm(fast * G);
#pragma omp for schedule(dynamic, 1)
    for (long item = 0; item < (long)B * parts; ++item) {
      const int b = (int)(item / parts), h0 = (int)(item % parts) * per;
      const int h1 = h0 + per < Hkv ? h0 + per : Hkv;
      if (h0 >= h1) continue;
#ifdef HAVE_AVX512_BF16
      if constexpr (bf16_path) {
        attend_seq_bf16<DC / 32>(q + b * q_sb, q_sh, kv, tables + (long)b * max_blocks, ctx_lens[b],
                                 out + b * out_sb, out_sh, Hkv, h0, h1, G, bs, scale, window, acc.data(),
                                 sc.data(), mx.data(), sm.data());
        continue;
      }
#endif
      attend_seq<T, DC>(q + b * q_sb, q_sh, kv, tables + (long)b * max_blocks, ctx_lens[b],
                        out + b * out_sb, out_sh, Hkv, h0, h1, G, D, bs, scale, window, st.data(),
                        kbuf.data(), vbuf.data());
    }
  }
}

template <typename T>
void dispatch_d(const void* q, long q_sb, long q_sh, const void* kv, const int32_t* tables, int max_blocks,
                const int32_t* lens, void* out, long o_sb, long o_sh, int B, int H, int Hkv, int D, int bs,
                float scale, int window, int nt) {
  switch (D) {
    case 64: run<T, 64>(q, q_sb, q_sh, kv, tables, max_blocks, lens, out, o_sb, o_sh, B, H, Hkv, D, bs, scale, window, nt); break;
    case 128: run<T, 128>(q, q_sb, q_sh, kv, tables, max_blocks, lens, out, o_sb, o_sh, B, H, Hkv, D, bs, scale, window, nt); break;
    default: run<T, 0>(q, q_sb, q_sh, kv, tables, max_blocks, lens, out, o_sb, o_sh, B, H, Hkv, D, bs, scale, window, nt);
  }
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16, 2 float16. Strides are in elements. Returns 0, or -1 for shapes
// this kernel does not take (the caller then uses its torch path).
int paged_decode_attention(int dtype, const void* q, long q_stride_b, long q_stride_h, const void* kv,
                           const int32_t* block_tables, int max_blocks, const int32_t* ctx_lens,
                           void* out, long out_stride_b, long out_stride_h, int B, int H, int Hkv, int D,
                           int block_size, float scale, int window, int nthreads) {
  if (Hkv <= 0 || H % Hkv != 0 || H / Hkv > MAX_G || D > MAX_D || D <= 0 || block_size <= 0) return -1;
  switch (dtype) {
    case 0: dispatch_d<float>(q, q_stride_b, q_stride_h, kv, block_tables, max_blocks, ctx_lens, out, out_stride_b, out_stride_h, B, H, Hkv, D, block_size, scale, window, nthreads); return 0;
    case 1: dispatch_d<uint16_t>(q, q_stride_b, q_stride_h, kv, block_tables, max_blocks, ctx_lens, out, out_stride_b, out_stride_h, B, H, Hkv, D, block_size, scale, window, nthreads); return 0;
    case 2: dispatch_d<_Float16>(q, q_stride_b, q_stride_h, kv, block_tables, max_blocks, ctx_lens, out, out_stride_b, out_stride_h, B, H, Hkv, D, block_size, scale, window, nthreads); return 0;
  }
  return -1;
}

}  // extern "C"
