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

extern "C" __global__ void lava_rope(RopeArgs a, const void* x, const float* cos_t, const float* sin_t,
                                     void* out) {
    int64_t total = a.batch * a.tokens * a.heads * a.half_dim;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        int64_t i = t % a.half_dim;
        int64_t r = t / a.half_dim;
        int64_t h = r % a.heads;
        r /= a.heads;
        int64_t l = r % a.tokens;
        int64_t b = r / a.tokens;
        int64_t xo = b * a.x_bs + l * a.x_ls + h * a.x_hs + 2 * i;
        int64_t oo = b * a.o_bs + l * a.o_ls + h * a.o_hs + 2 * i;
        int64_t to = b * a.t_bs + l * a.t_ls + i;
        double c = cos_t[to], s = sin_t[to];
        double x0 = load_any(x, a.x_dtype, xo), x1 = load_any(x, a.x_dtype, xo + 1);
        store_any(out, a.out_dtype, oo, (float)(x0 * c - x1 * s));
        store_any(out, a.out_dtype, oo + 1, (float)(x0 * s + x1 * c));
    }
}
