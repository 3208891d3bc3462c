// Shared helpers for lava's kernels: dtype conversion through f32, block reductions,
// and the strided-index helper used by the elementwise families.
// Not compiled alone; every .cu includes it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#define LAVA_MAX_DIMS 6

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// __float2bfloat16 / __float2half round to nearest even, like the CPU reference.
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }


__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float red[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.f;
        w = warp_sum(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    return total;
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float red[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < (int)(blockDim.x >> 5) ? red[lane] : -INFINITY;
        w = warp_max(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    return total;
}

__device__ __forceinline__ float gelu_tanh_f(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float silu_f(float x) { return x / (1.f + expf(-x)); }

// Run-time dtype codes, shared with kernels/src/lib.rs (`DType as i32`).
#define LAVA_F32 0
#define LAVA_BF16 1
#define LAVA_F16 2
#define LAVA_F8E4M3 3

// Loads and stores through f32 with a run-time dtype; the switch is uniform across a warp.
__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t off) {
    switch (dtype) {
        case LAVA_BF16: return __bfloat162float(((const __nv_bfloat16*)p)[off]);
        case LAVA_F16: return __half2float(((const __half*)p)[off]);
        case LAVA_F8E4M3: {
            __half_raw h = __nv_cvt_fp8_to_halfraw(((const __nv_fp8_storage_t*)p)[off], __NV_E4M3);
            return __half2float(__half(h));
        }
        default: return ((const float*)p)[off];
    }
}

__device__ __forceinline__ void store_any(void* p, int dtype, int64_t off, float v) {
    switch (dtype) {
        case LAVA_BF16: ((__nv_bfloat16*)p)[off] = __float2bfloat16(v); break;
        case LAVA_F16: ((__half*)p)[off] = __float2half(v); break;
        // Round to nearest even, saturating to +-448; NaN stays NaN.
        case LAVA_F8E4M3: ((__nv_fp8_storage_t*)p)[off] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3); break;
        default: ((float*)p)[off] = v; break;
    }
}

// v rounded to `dtype` and back (the reference rounds intermediates at fixed points).
__device__ __forceinline__ float round_to(int dtype, float v) {
    switch (dtype) {
        case LAVA_BF16: return __bfloat162float(__float2bfloat16(v));
        case LAVA_F16: return __half2float(__float2half(v));
        case LAVA_F8E4M3: {
            __half_raw h = __nv_cvt_fp8_to_halfraw(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3), __NV_E4M3);
            return __half2float(__half(h));
        }
        default: return v;
    }
}

// Elementwise call description: an index space `shape` (ndim <= 6, already coalesced on
// the host) and, for up to three inputs and the output, a dtype and strides in elements.
struct ElemArgs {
    int32_t ndim;
    int32_t dtype[4];  // in0, in1, in2, out
    int32_t pad;
    int64_t numel;
    int64_t shape[LAVA_MAX_DIMS];
    int64_t stride[4][LAVA_MAX_DIMS];
    float p0, p1;
};

// Offsets of flat index `i` for the four operands (32-bit arithmetic when the host says the
// index space fits).
template <typename I>
__device__ __forceinline__ void elem_offsets(const ElemArgs& a, I i, int64_t off[4]) {
    off[0] = off[1] = off[2] = off[3] = 0;
#pragma unroll
    for (int d = LAVA_MAX_DIMS - 1; d >= 0; --d) {
        if (d < a.ndim) {
            I s = (I)a.shape[d];
            I idx = i % s;
            i /= s;
#pragma unroll
            for (int k = 0; k < 4; ++k) off[k] += (int64_t)idx * a.stride[k][d];
        }
    }
}

// Four consecutive elements at `off` (16-byte aligned for f32, 8-byte for bf16), through f32.
__device__ __forceinline__ void load4(const void* p, int dt, int64_t off, float v[4]) {
    if (dt == LAVA_BF16) {
        uint2 u = *reinterpret_cast<const uint2*>((const __nv_bfloat16*)p + off);
        float2 a = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u.x));
        float2 b = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u.y));
        v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
    } else if (dt == LAVA_F32) {
        float4 f = *reinterpret_cast<const float4*>((const float*)p + off);
        v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) v[k] = load_any(p, dt, off + k);
    }
}

__device__ __forceinline__ void store4(void* p, int dt, int64_t off, const float v[4]) {
    if (dt == LAVA_BF16) {
        __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]), b = __floats2bfloat162_rn(v[2], v[3]);
        uint2 u;
        u.x = *reinterpret_cast<uint32_t*>(&a);
        u.y = *reinterpret_cast<uint32_t*>(&b);
        *reinterpret_cast<uint2*>((__nv_bfloat16*)p + off) = u;
    } else if (dt == LAVA_F32) {
        *reinterpret_cast<float4*>((float*)p + off) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) store_any(p, dt, off + k, v[k]);
    }
}
