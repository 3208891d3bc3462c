// Elementwise kernels: unary (scale = cast, GELU-tanh, GELU-erf, clamp, SiLU, affine x*p0+p1, exp, neg, abs,
// sqr, sqrt, recip, tanh), binary (add, sub, mul, div, max, min), ternary (modulate
// x*(1+s)+t, gated residual x+y*g), exact raw copies (permute, slices, concatenation,
// nearest upsampling, index_select) and fill. Every operand has a run-time dtype (f32, bf16,
// f16, fp8 e4m3) and strides over one index space, so broadcasting is one launch. Math in
// f32 with explicit _rn intrinsics (no FMA contraction, like the CPU reference); stores
// round to nearest even (fp8: saturating).
//
// Build alone: nvcc -std=c++17 -O3 -cubin -gencode arch=compute_90a,code=sm_90a elementwise.cu
#include "common.cuh"

// Codes shared with kernels/src/elementwise.rs.
enum UnaryOp {
    U_SCALE = 0, U_GELU_TANH = 1, U_SILU = 2, U_AFFINE = 3, U_EXP = 4, U_NEG = 5,
    U_ABS = 6, U_SQR = 7, U_SQRT = 8, U_RECIP = 9, U_TANH = 10, U_GELU_ERF = 11, U_CLAMP = 12
};
enum BinaryOp { B_ADD = 0, B_SUB = 1, B_MUL = 2, B_DIV = 3, B_MAX = 4, B_MIN = 5 };
enum TernaryOp { T_MODULATE = 0, T_GATED_RESIDUAL = 1 };

__device__ __forceinline__ float unary_apply(int op, float x, float p0, float p1) {
    switch (op) {
        case U_GELU_TANH: return gelu_tanh_f(x);
        case U_SILU: return silu_f(x);
        case U_AFFINE: return __fadd_rn(__fmul_rn(x, p0), p1);
        case U_EXP: return expf(x);
        case U_NEG: return -x;
        case U_ABS: return fabsf(x);
        case U_SQR: return __fmul_rn(x, x);
        case U_SQRT: return __fsqrt_rn(x);
        case U_RECIP: return __frcp_rn(x);
        case U_TANH: return tanhf(x);
        case U_GELU_ERF: return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
        case U_CLAMP: return fminf(fmaxf(x, p0), p1);
        default: return p0 == 1.f ? x : __fmul_rn(x, p0);  // scale (cast)
    }
}

__device__ __forceinline__ float binary_apply(int op, float a, float b) {
    switch (op) {
        case B_SUB: return __fsub_rn(a, b);
        case B_MUL: return __fmul_rn(a, b);
        case B_DIV: return __fdiv_rn(a, b);
        case B_MAX: return fmaxf(a, b);
        case B_MIN: return fminf(a, b);
        default: return __fadd_rn(a, b);
    }
}

__device__ __forceinline__ float ternary_apply(int op, float a, float b, float c) {
    switch (op) {
        case T_GATED_RESIDUAL: return __fadd_rn(a, __fmul_rn(b, c));
        default: return __fadd_rn(__fmul_rn(a, __fadd_rn(1.f, b)), c);  // a * (1 + b) + c
    }
}

template <typename I>
__device__ void unary_body(const ElemArgs& a, int op, const void* x, void* out) {
    for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < (I)a.numel; i += (I)gridDim.x * blockDim.x) {
        int64_t off[4];
        elem_offsets<I>(a, i, off);
        float v = unary_apply(op, load_any(x, a.dtype[0], off[0]), a.p0, a.p1);
        store_any(out, a.dtype[3], off[3], v);
    }
}

template <typename I>
__device__ void binary_body(const ElemArgs& a, int op, const void* x, const void* y, void* out) {
    for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < (I)a.numel; i += (I)gridDim.x * blockDim.x) {
        int64_t off[4];
        elem_offsets<I>(a, i, off);
        float v = binary_apply(op, load_any(x, a.dtype[0], off[0]), load_any(y, a.dtype[1], off[1]));
        store_any(out, a.dtype[3], off[3], v);
    }
}

template <typename I>
__device__ void ternary_body(const ElemArgs& a, int op, const void* x, const void* y, const void* z,
                             void* out) {
    for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < (I)a.numel; i += (I)gridDim.x * blockDim.x) {
        int64_t off[4];
        elem_offsets<I>(a, i, off);
        float v = ternary_apply(op, load_any(x, a.dtype[0], off[0]), load_any(y, a.dtype[1], off[1]),
                                load_any(z, a.dtype[2], off[2]));
        store_any(out, a.dtype[3], off[3], v);
    }
}

extern "C" __global__ void lava_unary(ElemArgs a, int op, const void* x, void* out) {
    if (a.numel < (1ll << 31)) unary_body<uint32_t>(a, op, x, out);
    else unary_body<int64_t>(a, op, x, out);
}

extern "C" __global__ void lava_binary(ElemArgs a, int op, const void* x, const void* y, void* out) {
    if (a.numel < (1ll << 31)) binary_body<uint32_t>(a, op, x, y, out);
    else binary_body<int64_t>(a, op, x, y, out);
}

extern "C" __global__ void lava_ternary(ElemArgs a, int op, const void* x, const void* y, const void* z,
                                        void* out) {
    if (a.numel < (1ll << 31)) ternary_body<uint32_t>(a, op, x, y, z, out);
    else ternary_body<int64_t>(a, op, x, y, z, out);
}

// Exact copies of 1, 2 or 4-byte elements. `a.shape` is the output index space; input
// index along dim d is out_index / fac[d] (1 for plain strided copies, h/w factors for
// nearest upsampling); a.stride[0] are input strides, a.stride[3] output strides.
struct CopyFactors {
    int32_t f[LAVA_MAX_DIMS];
};

template <typename T>
__device__ void copy_body(const ElemArgs& a, const CopyFactors& fac, const T* x, T* out) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < a.numel;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t rem = i, in_off = 0, out_off = 0;
        for (int d = a.ndim - 1; d >= 0; --d) {
            int64_t idx = rem % a.shape[d];
            rem /= a.shape[d];
            in_off += (idx / fac.f[d]) * a.stride[0][d];
            out_off += idx * a.stride[3][d];
        }
        out[out_off] = x[in_off];
    }
}

extern "C" __global__ void lava_copy_raw(ElemArgs a, CopyFactors fac, int elem_bytes, const void* x, void* out) {
    switch (elem_bytes) {
        case 1: copy_body<uint8_t>(a, fac, (const uint8_t*)x, (uint8_t*)out); break;
        case 2: copy_body<uint16_t>(a, fac, (const uint16_t*)x, (uint16_t*)out); break;
        default: copy_body<uint32_t>(a, fac, (const uint32_t*)x, (uint32_t*)out); break;
    }
}

// out[o, j, i] = x[o, ids[j], i] for x [outer, dim, inner] (raw elements).
extern "C" __global__ void lava_index_select(int64_t outer, int64_t dim, int64_t inner, int64_t nids,
                                             int elem_bytes, const uint32_t* ids, const void* x, void* out) {
    int64_t total = outer * nids * inner;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        int64_t i = t % inner, r = t / inner;
        int64_t j = r % nids, o = r / nids;
        int64_t src = (o * dim + ids[j]) * inner + i;
        switch (elem_bytes) {
            case 1: ((uint8_t*)out)[t] = ((const uint8_t*)x)[src]; break;
            case 2: ((uint16_t*)out)[t] = ((const uint16_t*)x)[src]; break;
            default: ((uint32_t*)out)[t] = ((const uint32_t*)x)[src]; break;
        }
    }
}

// Every element = value rounded to `dtype` (NaN poisons).
extern "C" __global__ void lava_fill(void* out, int dtype, int64_t n, float value) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        store_any(out, dtype, i, value);
}

// Fast path of lava_binary / lava_ternary for row layouts (what the DiT block feeds them):
// out[r, j] = op(x, y[, z]) where each input is either full ([rows, n], contiguous) or one row
// per group of `per_group` rows ([rows / per_group, n], broadcast over its rows), and out is
// full. Four consecutive columns per thread, 8/16-byte accesses for bf16/f32 (n % 4 == 0 and
// aligned bases, checked by the launcher); same _rn arithmetic as the generic kernels.
struct RowwiseArgs {
    int64_t rows, n, per_group;
    int32_t dtype[4];    // x, y, z, out
    int32_t grouped[3];  // input k is one row per group
    int32_t nin;         // 2: binary op, 3: ternary op
    int32_t op;
    int32_t pad;
};

template <typename I>
__device__ void rowwise_body(const RowwiseArgs& a, const void* x, const void* y, const void* z, void* out) {
    const I nv = (I)(a.n / 4), total = (I)a.rows * nv, pg = (I)a.per_group, n = (I)a.n;
    for (I v = blockIdx.x * (I)blockDim.x + threadIdx.x; v < total; v += (I)gridDim.x * blockDim.x) {
        const I r = v / nv, j = (v - r * nv) * 4;
        const int64_t full = (int64_t)r * n + j, grp = (int64_t)(r / pg) * n + j;
        float p[4], q[4], w[4] = {0.f, 0.f, 0.f, 0.f}, o[4];
        load4(x, a.dtype[0], a.grouped[0] ? grp : full, p);
        load4(y, a.dtype[1], a.grouped[1] ? grp : full, q);
        if (a.nin == 3) load4(z, a.dtype[2], a.grouped[2] ? grp : full, w);
#pragma unroll
        for (int k = 0; k < 4; ++k)
            o[k] = a.nin == 3 ? ternary_apply(a.op, p[k], q[k], w[k]) : binary_apply(a.op, p[k], q[k]);
        store4(out, a.dtype[3], full, o);
    }
}

extern "C" __global__ void lava_rowwise(RowwiseArgs a, const void* x, const void* y, const void* z, void* out) {
    if (a.rows * a.n < (1ll << 31)) rowwise_body<uint32_t>(a, x, y, z, out);
    else rowwise_body<int64_t>(a, x, y, z, out);
}
