// The Wan VAE's norm → SiLU step in one pass (model-spec §1.5): on x [N, C, T, S] (S = H·W),
// y = SiLU(x / max(||x[n, :, t, s]||_2, eps) · scale · gamma[c]) in f32, rounded once to
// out's dtype; optionally the last `tail` frames of that f32 value again, as the f32
// [N, C, tail, S] causal cache of the convolution y feeds (the reference caches the f32 norm
// output and rounds it to bf16 only inside the conv).
// One thread per (n, t, s): a warp reads 32 consecutive s of one channel (coalesced), two
// passes over C (sum of squares, then the output); 32-bit indices within one (n) image.
//
// Build alone: nvcc -std=c++17 -O3 -cubin -gencode arch=compute_90a,code=sm_90a vae.cu
#include "common.cuh"

struct NormSiluArgs {
    int64_t batch, channels, frames, spatial;
    int64_t tail;    // 0: no tail output
    int64_t prefix;  // frames of `pre` copied (rounded to out's dtype) in front of the output
    int32_t x_dtype, out_dtype, w_dtype, pre_dtype;
    float eps, scale;
};

// out [N, C, prefix + frames, S]: out[:, :, :prefix] = pre, out[:, :, prefix:] = the norm → SiLU
// of x [N, C, frames, S] (a causal conv's input with its cached frames in front, in one pass).
extern "C" __global__ void lava_channel_norm_silu(NormSiluArgs a, const void* x, const void* w, const void* pre,
                                                  void* out, float* tail) {
    const int64_t of = a.prefix + a.frames;
    const int64_t oplane = of * a.spatial;  // (frame, s) positions per output image
    const int64_t total = a.batch * oplane;
    const int64_t t0 = a.frames - a.tail;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t n = i / oplane, q = i - n * oplane;
        int64_t f = q / a.spatial, s = q - f * a.spatial;
        int64_t obase = n * a.channels * oplane + q;
        if (f < a.prefix) {
            int64_t pplane = a.prefix * a.spatial;
            int64_t pbase = n * a.channels * pplane + f * a.spatial + s;
            for (int64_t c = 0; c < a.channels; ++c)
                store_any(out, a.out_dtype, obase + c * oplane, load_any(pre, a.pre_dtype, pbase + c * pplane));
            continue;
        }
        int64_t t = f - a.prefix;
        int64_t plane = a.frames * a.spatial;
        int64_t base = n * a.channels * plane + t * a.spatial + s;
        float ss = 0.f;
        for (int64_t c = 0; c < a.channels; ++c) {
            float v = load_any(x, a.x_dtype, base + c * plane);
            ss += v * v;
        }
        float inv = a.scale / fmaxf(sqrtf(ss), a.eps);
        bool in_tail = tail != nullptr && t >= t0;
        int64_t tbase = (n * a.channels * a.tail + (t - t0)) * a.spatial + s;
        for (int64_t c = 0; c < a.channels; ++c) {
            float y = load_any(x, a.x_dtype, base + c * plane) * inv * load_any(w, a.w_dtype, c);
            y = silu_f(y);
            store_any(out, a.out_dtype, obase + c * oplane, y);
            if (in_tail) tail[tbase + c * a.tail * a.spatial] = y;
        }
    }
}

// out[b, c, r] = x[b, r, c] for 2- or 4-byte elements: 32×32 tiles through shared memory so
// that both the reads and the writes are coalesced (NCDHW ↔ NDHWC for the convolutions).
template <typename T>
__device__ void transpose_body(int64_t rows, int64_t cols, const T* x, T* out) {
    __shared__ T tile[32][33];
    int64_t b = blockIdx.z;
    int64_t r0 = (int64_t)blockIdx.y * 32, c0 = (int64_t)blockIdx.x * 32;
    const T* xb = x + b * rows * cols;
    T* ob = out + b * rows * cols;
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        int64_t r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = xb[r * cols + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        int64_t c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < cols) ob[c * rows + r] = tile[threadIdx.x][i];
    }
}

extern "C" __global__ void lava_transpose_tiled(int elem_bytes, int64_t rows, int64_t cols, const void* x,
                                                void* out) {
    if (elem_bytes == 2) transpose_body<uint16_t>(rows, cols, (const uint16_t*)x, (uint16_t*)out);
    else transpose_body<uint32_t>(rows, cols, (const uint32_t*)x, (uint32_t*)out);
}
