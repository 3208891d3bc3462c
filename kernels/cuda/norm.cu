// Row reductions: LayerNorm (affine optional, eps per call), RMSNorm over the full row
// width (Wan's WanRMSNorm: normalised value rounded to x's dtype before the weight), the
// VAE's channel RMS norm (F.normalize over dim 1 times sqrt(C)·gamma + bias, on [B, C, S]
// with S = T·H·W), softmax over the last dim, row sum/mean/max/absmax, and the GEMM
// epilogue fallback (bias + activation per row or per column).
// One block per row; f32 accumulation, two passes (mean, then centred variance) so f32
// results match a double-free CPU reference to ~1e-6. Run-time dtypes as in elementwise.cu.
//
// Build alone: nvcc -std=c++17 -O3 -cubin -gencode arch=compute_90a,code=sm_90a norm.cu
#include "common.cuh"

struct RowArgs {
    int64_t rows;
    int64_t n;           // row width
    int64_t x_stride;    // elements between rows of x
    int64_t out_stride;  // elements between rows of out
    int32_t x_dtype, out_dtype, w_dtype, b_dtype;
    int32_t has_w, has_b;
    float eps;
    float pad;
};

extern "C" __global__ void lava_layernorm(RowArgs a, const void* x, const void* w, const void* b, void* out) {
    int64_t row = blockIdx.x;
    if (row >= a.rows) return;
    int64_t xo = row * a.x_stride, oo = row * a.out_stride;
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) s += load_any(x, a.x_dtype, xo + j);
    float mean = block_sum(s) / (float)a.n;
    float v = 0.f;
    for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
        float d = load_any(x, a.x_dtype, xo + j) - mean;
        v += d * d;
    }
    float rstd = rsqrtf(block_sum(v) / (float)a.n + a.eps);
    for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
        float y = (load_any(x, a.x_dtype, xo + j) - mean) * rstd;
        if (a.has_w) y *= load_any(w, a.w_dtype, j);
        if (a.has_b) y += load_any(b, a.b_dtype, j);
        store_any(out, a.out_dtype, oo + j, y);
    }
}

extern "C" __global__ void lava_rmsnorm(RowArgs a, const void* x, const void* w, void* out) {
    int64_t row = blockIdx.x;
    if (row >= a.rows) return;
    int64_t xo = row * a.x_stride, oo = row * a.out_stride;
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
        float t = load_any(x, a.x_dtype, xo + j);
        s += t * t;
    }
    float rstd = rsqrtf(block_sum(s) / (float)a.n + a.eps);
    for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
        float y = round_to(a.x_dtype, load_any(x, a.x_dtype, xo + j) * rstd);
        if (a.has_w) y *= load_any(w, a.w_dtype, j);
        store_any(out, a.out_dtype, oo + j, y);
    }
}

extern "C" __global__ void lava_softmax(RowArgs a, const void* x, void* out) {
    int64_t row = blockIdx.x;
    if (row >= a.rows) return;
    int64_t xo = row * a.x_stride, oo = row * a.out_stride;
    float m = -INFINITY;
    for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) m = fmaxf(m, load_any(x, a.x_dtype, xo + j));
    m = block_max(m);
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) s += expf(load_any(x, a.x_dtype, xo + j) - m);
    float inv = 1.f / block_sum(s);
    for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x)
        store_any(out, a.out_dtype, oo + j, expf(load_any(x, a.x_dtype, xo + j) - m) * inv);
}

// Channel RMS norm on contiguous [B, C, S]: one thread per (b, s), looping over C, so a warp
// reads 32 consecutive s (coalesced). y = x / max(||x||_2, eps) * scale * gamma[c] + bias[c].
struct ChannelArgs {
    int64_t batch, channels, spatial;
    int32_t x_dtype, out_dtype, w_dtype, b_dtype;
    int32_t has_w, has_b;
    float eps, scale;
};

extern "C" __global__ void lava_channel_rmsnorm(ChannelArgs a, const void* x, const void* w, const void* b,
                                                void* out) {
    int64_t total = a.batch * a.spatial;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        int64_t bi = t / a.spatial, si = t % a.spatial;
        int64_t base = bi * a.channels * a.spatial + si;
        float ss = 0.f;
        for (int64_t c = 0; c < a.channels; ++c) {
            float v = load_any(x, a.x_dtype, base + c * a.spatial);
            ss += v * v;
        }
        float inv = a.scale / fmaxf(sqrtf(ss), a.eps);
        for (int64_t c = 0; c < a.channels; ++c) {
            float y = load_any(x, a.x_dtype, base + c * a.spatial) * inv;
            if (a.has_w) y *= load_any(w, a.w_dtype, c);
            if (a.has_b) y += load_any(b, a.b_dtype, c);
            store_any(out, a.out_dtype, base + c * a.spatial, y);
        }
    }
}

// Row reductions to f32 [rows]: op 0 sum, 1 mean, 2 max, 3 max |x| (0 for an empty row).
extern "C" __global__ void lava_reduce_rows(RowArgs a, int op, const void* x, float* out) {
    int64_t row = blockIdx.x;
    if (row >= a.rows) return;
    int64_t xo = row * a.x_stride;
    float r;
    if (op <= 1) {
        float s = 0.f;
        for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) s += load_any(x, a.x_dtype, xo + j);
        r = block_sum(s);
        if (op == 1) r /= (float)a.n;
    } else {
        float m = op == 2 ? -INFINITY : 0.f;
        for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
            float v = load_any(x, a.x_dtype, xo + j);
            m = fmaxf(m, op == 2 ? v : fabsf(v));
        }
        r = block_max(m);
    }
    if (threadIdx.x == 0) out[row] = r;
}

// out[r, c] = act(x[r, c] + bias[c or r % bias_n]) on contiguous [rows, cols]; act 0 none,
// 1 GELU-tanh, 2 SiLU. x and out may be the same buffer (each element is read, then
// written, by one thread). Per-row bias repeats every bias_n rows (conv output [B, C, L]).
extern "C" __global__ void lava_bias_act(int64_t rows, int64_t cols, int64_t bias_n, int x_dtype, int out_dtype,
                                         int bias_dtype, int has_bias, int bias_per_row, int act, const void* x,
                                         const void* bias, void* out) {
    int64_t n = rows * cols;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float v = load_any(x, x_dtype, i);
        if (has_bias) v = __fadd_rn(v, load_any(bias, bias_dtype, bias_per_row ? (i / cols) % bias_n : i % cols));
        if (act == 1) v = gelu_tanh_f(v);
        else if (act == 2) v = silu_f(v);
        store_any(out, out_dtype, i, v);
    }
}

// The DiT block's residual -> LayerNorm -> adaLN-modulate chain in one pass (one block per
// row, the row cached in registers when it fits):
//   r = x (+ y (* gate[g]))                  f32, _rn ops; stored to `res` when res_dtype >= 0
//   n = LN(round_to(ln_in, r)) (* w + b)     f32 statistics, two passes; rounded to norm_dtype
//   out = n * (1 + scale[g]) + shift[g]      f32 when has_mod; one rounding to out_dtype
// with g = row / per_group (the latent frame of the token). Each rounding sits where the
// unfused ops round, so fused == unfused up to the order of the f32 sums.
struct ResNormArgs {
    int64_t rows, n, per_group;
    int32_t x_dtype, y_dtype, gate_dtype, w_dtype, b_dtype, sc_dtype, sh_dtype;
    int32_t res_dtype;  // -1: no residual output
    int32_t ln_in_dtype, norm_dtype, out_dtype;
    int32_t has_y, has_gate, has_w, has_b, has_mod;
    float eps;
    int32_t pad;  // nonzero: the launcher gave n floats of dynamic shared memory
    int32_t vec4; // nonzero: n % 4 == 0, operands 16-byte aligned, row in shared memory
    int32_t pad2;
};

__device__ __forceinline__ float rn_resid(const ResNormArgs& a, const void* x, const void* y, const void* gate,
                                          int64_t xo, int64_t go, int64_t j) {
    float r = load_any(x, a.x_dtype, xo + j);
    if (a.has_y) {
        float yv = load_any(y, a.y_dtype, xo + j);
        r = a.has_gate ? __fadd_rn(r, __fmul_rn(yv, load_any(gate, a.gate_dtype, go + j))) : __fadd_rn(r, yv);
    }
    return r;
}

__device__ __forceinline__ float rn_finish(const ResNormArgs& a, const void* w, const void* b, const void* sc,
                                           const void* sh, int64_t go, int64_t j, float v, float mean, float rstd) {
    float t = __fmul_rn(__fsub_rn(v, mean), rstd);
    if (a.has_w) t = __fmul_rn(t, load_any(w, a.w_dtype, j));
    if (a.has_b) t = __fadd_rn(t, load_any(b, a.b_dtype, j));
    t = round_to(a.norm_dtype, t);
    if (a.has_mod)
        t = __fadd_rn(__fmul_rn(t, __fadd_rn(1.f, load_any(sc, a.sc_dtype, go + j))), load_any(sh, a.sh_dtype, go + j));
    return t;
}

// The LN input row is kept in dynamic shared memory (n floats, each thread touching only its
// own elements) when the launcher gives enough; otherwise it is recomputed from x and y.
extern "C" __global__ void __launch_bounds__(256) lava_res_norm_mod(ResNormArgs a, const void* x, const void* y,
                                                                    const void* gate, const void* w, const void* b,
                                                                    const void* sc, const void* sh, void* res,
                                                                    void* out) {
    extern __shared__ float rn_row[];
    int64_t row = blockIdx.x;
    if (row >= a.rows) return;
    const int64_t xo = row * a.n, go = (row / a.per_group) * a.n, step = blockDim.x;
    if (a.vec4) {
        // Four columns per thread and access; same arithmetic as below.
        const int rd4 = a.res_dtype < 0 ? LAVA_F32 : a.res_dtype;
        float s4 = 0.f;
        for (int64_t j = 4 * threadIdx.x; j < a.n; j += 4 * step) {
            float r[4], yv[4], gv[4];
            load4(x, a.x_dtype, xo + j, r);
            if (a.has_y) {
                load4(y, a.y_dtype, xo + j, yv);
                if (a.has_gate) load4(gate, a.gate_dtype, go + j, gv);
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    r[k] = a.has_gate ? __fadd_rn(r[k], __fmul_rn(yv[k], gv[k])) : __fadd_rn(r[k], yv[k]);
            }
            if (a.res_dtype >= 0) store4(res, a.res_dtype, xo + j, r);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                float v = round_to(a.ln_in_dtype, round_to(rd4, r[k]));
                rn_row[j + k] = v;
                s4 += v;
            }
        }
        const float mean4 = block_sum(s4) / (float)a.n;
        float q4 = 0.f;
        for (int64_t j = 4 * threadIdx.x; j < a.n; j += 4 * step) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                float d = rn_row[j + k] - mean4;
                q4 += d * d;
            }
        }
        const float rstd4 = rsqrtf(block_sum(q4) / (float)a.n + a.eps);
        for (int64_t j = 4 * threadIdx.x; j < a.n; j += 4 * step) {
            float w4[4], b4[4], sc4[4], sh4[4], o[4];
            if (a.has_w) load4(w, a.w_dtype, j, w4);
            if (a.has_b) load4(b, a.b_dtype, j, b4);
            if (a.has_mod) {
                load4(sc, a.sc_dtype, go + j, sc4);
                load4(sh, a.sh_dtype, go + j, sh4);
            }
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                float t = __fmul_rn(__fsub_rn(rn_row[j + k], mean4), rstd4);
                if (a.has_w) t = __fmul_rn(t, w4[k]);
                if (a.has_b) t = __fadd_rn(t, b4[k]);
                t = round_to(a.norm_dtype, t);
                if (a.has_mod) t = __fadd_rn(__fmul_rn(t, __fadd_rn(1.f, sc4[k])), sh4[k]);
                o[k] = t;
            }
            store4(out, a.out_dtype, xo + j, o);
        }
        return;
    }
    const bool cached = a.pad != 0;
    const int rd = a.res_dtype < 0 ? LAVA_F32 : a.res_dtype;
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < a.n; j += step) {
        float r = rn_resid(a, x, y, gate, xo, go, j);
        if (a.res_dtype >= 0) store_any(res, a.res_dtype, xo + j, r);
        float v = round_to(a.ln_in_dtype, round_to(rd, r));
        if (cached) rn_row[j] = v;
        s += v;
    }
    const float mean = block_sum(s) / (float)a.n;
    float q = 0.f;
    for (int64_t j = threadIdx.x; j < a.n; j += step) {
        float v = cached ? rn_row[j] : round_to(a.ln_in_dtype, round_to(rd, rn_resid(a, x, y, gate, xo, go, j)));
        float d = v - mean;
        q += d * d;
    }
    const float rstd = rsqrtf(block_sum(q) / (float)a.n + a.eps);
    for (int64_t j = threadIdx.x; j < a.n; j += step) {
        float v = cached ? rn_row[j] : round_to(a.ln_in_dtype, round_to(rd, rn_resid(a, x, y, gate, xo, go, j)));
        store_any(out, a.out_dtype, xo + j, rn_finish(a, w, b, sc, sh, go, j, v, mean, rstd));
    }
}
