// Decode-sized bfloat16 GEMMs on AMX: y[M, N] = x[M, K] . w[N, K]^T (+ bias), M <= 32.
//
// Why: a decode step multiplies a handful of rows by every weight of the model, so it is bound by
// how fast the weights stream from DRAM. oneDNN's F.linear reached ~10 GB/s of weights at 1-16
// rows on a 2-core Xeon with AMX (torch 2.13.0); this kernel reads the plain [N, K] weight with
// AMX tile loads (16 weight rows x 64 bytes per load, so the weight needs no repacking and keeps
// its memory) and reached ~16 GB/s on the same machine: one 150M-model step's GEMMs at 8 rows,
// 24.5 -> 17 ms. The roles are swapped against the usual GEMM: the weight is the A tile (16
// output features x 32 inputs), the activations are the B tile (packed once per call into
// AMX's pair layout, 16 rows a tile), so C tiles hold [16 features x 16 rows] in float32.
// Products of bfloat16 are exact in float32 and the sums run in float32, as in a bfloat16 GEMM;
// the results equalled F.linear's bit for bit in every test here.
//
// Compiled with the paged decode kernel by engine/cpu_kernels.py (-march=native); where the
// compiler does not target AMX the entry points report "unavailable" and the engine keeps
// F.linear.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#endif

namespace {

inline uint16_t to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

#ifdef HAVE_AMX
struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles: C[feature block f][row block r] = tmm(f + 2 r), A (weights) tmm4/5, B (rows) tmm6/7.
// Every tile is 16 rows x 64 bytes.
void configure_tiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// One output feature by dot products (the N % 32 tail), K % 32 == 0.
float dot_row(const uint16_t* w, const uint16_t* x, long K) {
  __m512 acc = _mm512_setzero_ps();
  for (long k = 0; k < K; k += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(w + k));
  return _mm512_reduce_add_ps(acc);
}
#endif

}  // namespace

extern "C" {

// 1 when this build has the AMX kernel and the kernel asked Linux for the AMX tile state (once
// per process, ARCH_REQ_XCOMP_PERM); 0 otherwise.
int small_gemm_available() {
#ifdef HAVE_AMX
  static int granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted;
#else
  return 0;
#endif
}

// x: [M, K] rows ldx elements apart; w: [N, K] contiguous; bias: float32 [N] or null;
// y: [M, N] rows ldy elements apart. Returns 0, or 1 for shapes it does not take (M > 32,
// K % 32 != 0) and 2 where AMX is unavailable.
int small_gemm_bf16(const uint16_t* x, long ldx, const uint16_t* w, const float* bias, uint16_t* y,
                    long ldy, long M, long N, long K, int threads) {
#ifdef HAVE_AMX
  if (!small_gemm_available()) return 2;
  if (M < 1 || M > 32 || K < 32 || K % 32) return 1;
  const int row_blocks = M > 16 ? 2 : 1;
  // Rows packed in AMX's pair layout, zero-padded to 16 a block: xb[r][K/2][16][2].
  const long block_elems = (K / 2) * 32;
  uint16_t* xb = static_cast<uint16_t*>(std::aligned_alloc(64, sizeof(uint16_t) * row_blocks * block_elems));
  if (xb == nullptr) return 3;
  std::memset(xb, 0, sizeof(uint16_t) * row_blocks * block_elems);
  for (long m = 0; m < M; ++m) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(xb + (m / 16) * block_elems) + (m % 16);
    const uint32_t* src = reinterpret_cast<const uint32_t*>(x + m * ldx);  // bf16 pairs along K
    for (long kp = 0; kp < K / 2; ++kp) dst[kp * 16] = src[kp];
  }
  const long full = N / 32;
#pragma omp parallel num_threads(threads)
  {
    configure_tiles();
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    alignas(64) float c[4][16][16];
    for (long b = full * t / nt, end = full * (t + 1) / nt; b < end; ++b) {
      const uint16_t* w0 = w + b * 32 * K;
      const uint16_t* w1 = w0 + 16 * K;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (long k = 0; k < K; k += 32) {
        _tile_loadd(4, w0 + k, K * 2);
        _tile_loadd(5, w1 + k, K * 2);
        _tile_loadd(6, xb + k * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (row_blocks > 1) {
          _tile_loadd(7, xb + block_elems + k * 16, 64);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      if (row_blocks > 1) {
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
      }
      for (long m = 0; m < M; ++m)
        for (int f = 0; f < 32; ++f) {
          const long n = b * 32 + f;
          y[m * ldy + n] = to_bf16(c[(f / 16) + 2 * (m / 16)][f % 16][m % 16] + (bias ? bias[n] : 0.f));
        }
    }
    _tile_release();
#pragma omp for
    for (long n = full * 32; n < N; ++n)
      for (long m = 0; m < M; ++m)
        y[m * ldy + n] = to_bf16(dot_row(w + n * K, x + m * ldx, K) + (bias ? bias[n] : 0.f));
  }
  std::free(xb);
  return 0;
#else
  (void)x, (void)ldx, (void)w, (void)bias, (void)y, (void)ldy, (void)M, (void)N, (void)K, (void)threads;
  return 2;
#endif
}

}  // extern "C"
