/* The middle of a fused decode-time FFN layer (romscale/rom/fused.py), for n tokens, in one call:

     out[:f]    = silu(o_gate) * o_up                     the FFN's activation
     out[f:f+m] = v / hypot(|R v|, eps_term)              the MeKi branch (when m > 0), with
     v          = fuse(e, o_mem)                          e: the token's ROM row for this layer

   where o = x @ [W_gate; W_up; W_gate_mem]^T and W_out = Q R, so |R v| = |W_out v|. The caller
   multiplies `out` by [W_down, sqrt(d) diag(w_post) W_out] in one matmul.

   Why C: at batch 1 on a small CPU each eager PyTorch op between the large matmuls cost 10-30 us in
   place (measured: the weights streaming by evict the interpreter's working set), so the MeKi
   branch's ~8 small ops cost more than its arithmetic and bytes together. One call does them all.
   Plain C with no torch headers: it builds in well under a second and is loaded with ctypes
   (romscale/rom/kernel.py). */
#include <math.h>
#include <stdint.h>

typedef struct {
  int64_t ffn;        /* f */
  int64_t d_mem;      /* m; 0 for an FFN without MeKi */
  int64_t o_stride;   /* floats between tokens in o   (2f + m) */
  int64_t e_stride;   /* floats between tokens in e   (MeKi layers x m) */
  int64_t out_stride; /* floats between tokens in out (f + m) */
  int64_t r_rows;     /* rows of R: min(d, m) */
  float eps_term;     /* sqrt(d * eps) of the post RMSNorm */
  int32_t fusion;     /* 0 add_sigmoid, 1 mul_sigmoid, 2 add_silu, 3 mul_silu */
} romscale_ffn_params;

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

void romscale_ffn_mid(const romscale_ffn_params *p, const float *o, const float *e, const float *r,
                      float *out, int64_t n) {
  const int64_t f = p->ffn, m = p->d_mem;
  for (int64_t t = 0; t < n; ++t) {
    const float *ot = o + t * p->o_stride;
    float *h = out + t * p->out_stride;
    for (int64_t k = 0; k < f; ++k) h[k] = ot[k] * sigmoidf(ot[k]) * ot[f + k];
    if (m == 0) continue;
    const float *g = ot + 2 * f, *et = e + t * p->e_stride;
    float *v = h + f;
    for (int64_t k = 0; k < m; ++k) {
      float s = sigmoidf(g[k]);
      float a = (p->fusion >= 2) ? g[k] * s : s; /* silu or sigmoid */
      v[k] = (p->fusion & 1) ? et[k] * a : et[k] + a;
    }
    /* R is upper trapezoidal and row-major: row j holds its non-zeros at k >= j, read contiguously
       (a column-order walk missed the cache on every element once the weights had streamed by). */
    double sq = 0.0;
    for (int64_t j = 0; j < p->r_rows; ++j) {
      const float *rj = r + j * m;
      float u = 0.0f;
      for (int64_t k = j; k < m; ++k) u += rj[k] * v[k];
      sq += (double)u * u;
    }
    const float scale = 1.0f / hypotf((float)sqrt(sq), p->eps_term);
    for (int64_t k = 0; k < m; ++k) v[k] *= scale;
  }
}
