// Interleaved-pair rotary embedding with per-token tables (Wan's rope_apply): for x of
// shape [B, L, H, D] (strides given), pair i = (x[2i], x[2i+1]) of token l is rotated by
// (cos[l, i], sin[l, i]): (a·c − b·s, a·s + b·c). Tables are f32 [B or 1, L, D/2] with a
// batch stride (0 broadcasts over the batch). Math in f64 (the reference multiplies in
// complex128), rounded to f32 and then to the output dtype.
//
// Build alone: nvcc -std=c++17 -O3 -cubin -gencode arch=compute_90a,code=sm_90a rope.cu
#include "common.cuh"

struct RopeArgs {
    int64_t batch, tokens, heads, half_dim;
    int64_t x_bs, x_ls, x_hs;        // x strides: batch, token, head (pairs contiguous)
    int64_t o_bs, o_ls, o_hs;        // out strides
    int64_t t_bs, t_ls;              // table strides: batch, token (pair index contiguous)
    int32_t x_dtype, out_dtype;
};

// One block per (batch, token) row, threads over that row's heads * half_dim pairs (32-bit
// index math inside a row).
extern "C" __global__ void lava_rope(RopeArgs a, const void* x, const float* cos_t, const float* sin_t,
                                     void* out) {
    const int64_t rows = a.batch * a.tokens;
    const int32_t half = (int32_t)a.half_dim, pairs = (int32_t)(a.heads * a.half_dim);
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t b = r / a.tokens, l = r % a.tokens;
        const int64_t xr = b * a.x_bs + l * a.x_ls, orow = b * a.o_bs + l * a.o_ls, tr = b * a.t_bs + l * a.t_ls;
        for (int32_t p = threadIdx.x; p < pairs; p += blockDim.x) {
            const int32_t h = p / half, i = p - h * half;
            const int64_t xo = xr + h * a.x_hs + 2 * i, oo = orow + h * a.o_hs + 2 * i;
            double c = cos_t[tr + i], s = sin_t[tr + i];
            double x0 = load_any(x, a.x_dtype, xo), x1 = load_any(x, a.x_dtype, xo + 1);
            store_any(out, a.out_dtype, oo, (float)(x0 * c - x1 * s));
            store_any(out, a.out_dtype, oo + 1, (float)(x0 * s + x1 * c));
        }
    }
}

// Wan's q/k path in one pass (model-spec §3.3.3 steps 1-2): RMSNorm over the full row of
// heads*head_dim (n = round_to(x_dtype, x * rsqrt(mean(x^2) + eps)), m = round_to(norm_dtype,
// n * w)), then the interleaved rotation of each pair of m with the row's (token's) table,
// in f64, rounded to f32 and then to out_dtype. One block per row, pairs cached in registers.
struct RmsRopeArgs {
    int64_t rows, heads, head_dim;
    int32_t x_dtype, w_dtype, norm_dtype, out_dtype;
    float eps;
    int32_t pad;
};

#define RR_MAXP 12  // pairs cached per thread: rows up to 2 * 12 * blockDim wide

extern "C" __global__ void __launch_bounds__(256) lava_rmsnorm_rope(RmsRopeArgs a, const void* x, const void* w,
                                                                    const float* cos_t, const float* sin_t,
                                                                    void* out) {
    int64_t row = blockIdx.x;
    if (row >= a.rows) return;
    const int64_t n = a.heads * a.head_dim, pairs = n / 2, half = a.head_dim / 2;
    const int64_t xo = row * n, step = blockDim.x;
    float p0[RR_MAXP], p1[RR_MAXP];
    const bool cached = pairs <= RR_MAXP * step;
    float s = 0.f;
    if (cached) {
#pragma unroll
        for (int k = 0; k < RR_MAXP; ++k) {
            int64_t p = threadIdx.x + k * step;
            p0[k] = p1[k] = 0.f;
            if (p < pairs) {
                p0[k] = load_any(x, a.x_dtype, xo + 2 * p);
                p1[k] = load_any(x, a.x_dtype, xo + 2 * p + 1);
                s += p0[k] * p0[k] + p1[k] * p1[k];
            }
        }
    } else {
        for (int64_t p = threadIdx.x; p < pairs; p += step) {
            float u = load_any(x, a.x_dtype, xo + 2 * p), v = load_any(x, a.x_dtype, xo + 2 * p + 1);
            s += u * u + v * v;
        }
    }
    const float rstd = rsqrtf(block_sum(s) / (float)n + a.eps);
    auto emit = [&](int64_t p, float u, float v) {
        float m0 = round_to(a.norm_dtype, round_to(a.x_dtype, u * rstd) * load_any(w, a.w_dtype, 2 * p));
        float m1 = round_to(a.norm_dtype, round_to(a.x_dtype, v * rstd) * load_any(w, a.w_dtype, 2 * p + 1));
        int64_t to = row * half + p % half;
        double c = cos_t[to], sn = sin_t[to];
        store_any(out, a.out_dtype, xo + 2 * p, (float)((double)m0 * c - (double)m1 * sn));
        store_any(out, a.out_dtype, xo + 2 * p + 1, (float)((double)m0 * sn + (double)m1 * c));
    };
    if (cached) {
#pragma unroll
        for (int k = 0; k < RR_MAXP; ++k) {
            int64_t p = threadIdx.x + k * step;
            if (p < pairs) emit(p, p0[k], p1[k]);
        }
    } else {
        for (int64_t p = threadIdx.x; p < pairs; p += step)
            emit(p, load_any(x, a.x_dtype, xo + 2 * p), load_any(x, a.x_dtype, xo + 2 * p + 1));
    }
}
