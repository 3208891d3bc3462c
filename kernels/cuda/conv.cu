// im2col for convolutions done as GEMMs (cuBLASLt): conv1d (stride, zero or replicate
// padding; groups handled by the GEMM's batch) and conv3d (stride, zero padding per side,
// e.g. the VAE's causal temporal padding (2, 0)). Raw element copies, any 1/2/4-byte dtype.
//   col1d[(c·K + k), l] = x[c, l·stride + k − pad_left]              (one batch entry)
//   col3d[((c·KT + kt)·KH + kh)·KW + kw, (t·H' + h)·W' + w] = x[c, t·st + kt − pt, ...]
//
// Build alone: nvcc -std=c++17 -O3 -cubin -gencode arch=compute_90a,code=sm_90a conv.cu
#include "common.cuh"

template <typename T>
__device__ void im2col1d_body(const T* x, T* col, int64_t c_in, int64_t l_in, int64_t kernel, int64_t stride,
                              int64_t pad_left, int64_t l_out, int replicate) {
    int64_t total = c_in * kernel * l_out;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        int64_t l = t % l_out, r = t / l_out;
        int64_t k = r % kernel, c = r / kernel;
        int64_t src = l * stride + k - pad_left;
        T v = T(0);
        if (src >= 0 && src < l_in) v = x[c * l_in + src];
        else if (replicate) v = x[c * l_in + (src < 0 ? 0 : l_in - 1)];
        col[t] = v;
    }
}

extern "C" __global__ void lava_im2col1d(int elem_bytes, const void* x, void* col, int64_t c_in, int64_t l_in,
                                         int64_t kernel, int64_t stride, int64_t pad_left, int64_t l_out,
                                         int replicate) {
    switch (elem_bytes) {
        case 1: im2col1d_body<uint8_t>((const uint8_t*)x, (uint8_t*)col, c_in, l_in, kernel, stride, pad_left, l_out, replicate); break;
        case 2: im2col1d_body<uint16_t>((const uint16_t*)x, (uint16_t*)col, c_in, l_in, kernel, stride, pad_left, l_out, replicate); break;
        default: im2col1d_body<uint32_t>((const uint32_t*)x, (uint32_t*)col, c_in, l_in, kernel, stride, pad_left, l_out, replicate); break;
    }
}

struct Conv3dArgs {
    int64_t c_in;
    int64_t in[3];      // T, H, W
    int64_t kernel[3];
    int64_t stride[3];
    int64_t pad[3];     // padding before each axis (after-padding is implied by out)
    int64_t out[3];     // T', H', W'
};

template <typename T>
__device__ void im2col3d_body(const Conv3dArgs& a, const T* x, T* col) {
    int64_t p = a.out[0] * a.out[1] * a.out[2];
    int64_t kvol = a.kernel[0] * a.kernel[1] * a.kernel[2];
    int64_t total = a.c_in * kvol * p;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        int64_t pos = t % p, r = t / p;
        int64_t ow = pos % a.out[2], oh = (pos / a.out[2]) % a.out[1], ot = pos / (a.out[2] * a.out[1]);
        int64_t kw = r % a.kernel[2], kh = (r / a.kernel[2]) % a.kernel[1];
        int64_t kt = (r / (a.kernel[2] * a.kernel[1])) % a.kernel[0], c = r / kvol;
        int64_t it = ot * a.stride[0] + kt - a.pad[0];
        int64_t ih = oh * a.stride[1] + kh - a.pad[1];
        int64_t iw = ow * a.stride[2] + kw - a.pad[2];
        T v = T(0);
        if (it >= 0 && it < a.in[0] && ih >= 0 && ih < a.in[1] && iw >= 0 && iw < a.in[2])
            v = x[((c * a.in[0] + it) * a.in[1] + ih) * a.in[2] + iw];
        col[t] = v;
    }
}

extern "C" __global__ void lava_im2col3d(Conv3dArgs a, int elem_bytes, const void* x, void* col) {
    switch (elem_bytes) {
        case 1: im2col3d_body<uint8_t>(a, (const uint8_t*)x, (uint8_t*)col); break;
        case 2: im2col3d_body<uint16_t>(a, (const uint16_t*)x, (uint16_t*)col); break;
        default: im2col3d_body<uint32_t>(a, (const uint32_t*)x, (uint32_t*)col); break;
    }
}
