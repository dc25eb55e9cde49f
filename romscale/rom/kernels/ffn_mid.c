/* The middle of a fused decode-time FFN layer (romscale/rom/fused.py), for n tokens, in one call:

     h = silu(o_gate) * o_up                                  the FFN's activation  -> h_out [n, f]
     y = RMSNorm_post(W_out v),  v = fuse(e, o_mem)           the MeKi branch       -> y_out [n, d]

   where o = x @ [W_gate; W_up; W_gate_mem]^T (one matmul, all three read x) and e is the token's ROM
   row for this layer. The caller then runs down(h) with y as the bias. With d_mem = 0 (an FFN
   without MeKi) only h is computed.

   Why C: at batch 1 on a small CPU, eager PyTorch ops between the large matmuls cost far more in
   place than in a micro-benchmark (the weights streaming by evict the interpreter's working set):
   with the same fused layout, eager ops took ~70 us per layer more than this kernel
   (results/decode_profile_cpu.json), more than the branch's arithmetic and bytes together.
   W_out is read row by row, contiguously: a layout that spread it over many pages (as columns of a
   concatenated down matrix) was slower again, from TLB misses on a VM. Plain C with no torch
   headers: it builds in well under a second and is loaded with ctypes (romscale/rom/kernel.py). */
#include <math.h>
#include <stdint.h>

typedef struct {
  int64_t ffn;        /* f */
  int64_t d_mem;      /* m; 0 for an FFN without MeKi */
  int64_t d_model;    /* d */
  int64_t o_stride;   /* floats between tokens in o (2f + m) */
  int64_t e_stride;   /* floats between tokens in e (MeKi layers x m) */
  float eps;          /* of the post RMSNorm */
  int32_t fusion;     /* 0 add_sigmoid, 1 mul_sigmoid, 2 add_silu, 3 mul_silu */
} romscale_ffn_params;

/* Built with -ffast-math (so expf vectorises), which assumes no inf: clamp so expf never overflows.
   Past |x| = 80 float sigmoid is already 1 (or below 2e-35), so the result is unchanged. */
static inline float sigmoidf(float x) {
  x = x < -80.0f ? -80.0f : (x > 80.0f ? 80.0f : x);
  return 1.0f / (1.0f + expf(-x));
}

void romscale_ffn_mid(const romscale_ffn_params *p, const float *o, const float *e, const float *w_out,
                      const float *w_post, float *h_out, float *y_out, int64_t n) {
  const int64_t f = p->ffn, m = p->d_mem, d = p->d_model;
  for (int64_t t = 0; t < n; ++t) {
    const float *ot = o + t * p->o_stride;
    float *h = h_out + t * f;
    for (int64_t k = 0; k < f; ++k) h[k] = ot[k] * sigmoidf(ot[k]) * ot[f + k];
    if (m == 0) continue;
    const float *g = ot + 2 * f, *et = e + t * p->e_stride;
    float v[m]; /* m <= 8192: the caller checks */
    for (int64_t k = 0; k < m; ++k) {
      const float s = sigmoidf(g[k]);
      const float a = (p->fusion >= 2) ? g[k] * s : s; /* silu or sigmoid */
      v[k] = (p->fusion & 1) ? et[k] * a : et[k] + a;
    }
    float *y = y_out + t * d;
    double sq = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      const float *row = w_out + i * m;
      float z = 0.0f;
      for (int64_t k = 0; k < m; ++k) z += row[k] * v[k];
      y[i] = z;
      sq += (double)z * z;
    }
    const float inv_rms = 1.0f / sqrtf((float)(sq / (double)d) + p->eps);
    for (int64_t i = 0; i < d; ++i) y[i] *= inv_rms * w_post[i];
  }
}
