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
#include <vector>

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
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<HeadState> st(per);
    std::vector<float> kbuf((size_t)per * CHUNK * D), vbuf((size_t)per * CHUNK * D);
#pragma omp for schedule(dynamic, 1)
    for (long item = 0; item < (long)B * parts; ++item) {
      const int b = (int)(item / parts), h0 = (int)(item % parts) * per;
      const int h1 = h0 + per < Hkv ? h0 + per : Hkv;
      if (h0 < h1)
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
