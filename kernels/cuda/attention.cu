// Non-causal scaled-dot-product attention, FlashAttention-2 style, bf16 in/out, f32
// accumulation, head dim 128: O = softmax(Q·Kᵀ·scale)·V per (batch, head), keys beyond
// `lk` masked. Q/K/V/O are [B, L, H, 128] with arbitrary batch/token/head strides (the
// last dim contiguous), so fused-QKV views need no copy.
//
// Design: one block per (BR query rows, head, batch), BR/16 warps each owning 16 rows.
// Q fragments live in registers; K and V tiles of 64 keys stream through shared memory
// with cp.async (K_{j+1} loads while P·V_j runs, V_j while Q·K_jᵀ runs), XOR-swizzled
// 16-byte chunks so ldmatrix is conflict-free. mma.sync m16n8k16 bf16; online softmax in
// the exp2 domain; P goes from the S accumulators to A fragments without shared memory.
// Variants: BR = 64 (4 warps) and BR = 128 (8 warps).
//
// Build alone: nvcc -std=c++17 -O3 -cubin -gencode arch=compute_90a,code=sm_90a attention.cu
#include "common.cuh"

#define HD 128
#define BC 64
#define CHUNKS (HD / 8)  // 16-byte chunks per row

struct AttnArgs {
    int64_t q_bs, q_ls, q_hs;
    int64_t k_bs, k_ls, k_hs;
    int64_t v_bs, v_ls, v_hs;
    int64_t o_bs, o_ls, o_hs;
    int32_t lq, lk;
    float scale_log2;  // softmax scale · log2(e)
    int32_t pad;
};

// Byte offset of 16-byte chunk `c` of row `r` in a [rows][128] bf16 tile.
__device__ __forceinline__ uint32_t swz(int r, int c) { return (uint32_t)(r * HD * 2 + ((c ^ (r & 7)) << 4)); }

__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, bool valid) {
    int n = valid ? 16 : 0;  // 0 bytes read: the chunk is zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Loads `rows` rows of 128 bf16 starting at token `row0` into a swizzled tile; rows at or
// past `limit` are zero-filled.
template <int NT>
__device__ __forceinline__ void load_tile(uint32_t smem, const __nv_bfloat16* base, int64_t ls, int row0,
                                          int rows, int limit) {
    for (int idx = threadIdx.x; idx < rows * CHUNKS; idx += NT) {
        int r = idx / CHUNKS, c = idx % CHUNKS;
        int tok = row0 + r;
        bool valid = tok < limit;
        const __nv_bfloat16* src = base + (valid ? (int64_t)tok * ls : 0) + c * 8;
        cp_async16(smem + swz(r, c), src, valid);
    }
}

template <int BR>
__device__ __forceinline__ void attn_body(const AttnArgs& a, const __nv_bfloat16* __restrict__ q,
                                          const __nv_bfloat16* __restrict__ k,
                                          const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o) {
    constexpr int NT = BR * 2;  // 16 rows per warp
    extern __shared__ __align__(128) uint8_t smem_raw[];
    const uint32_t sq = (uint32_t)__cvta_generic_to_shared(smem_raw);
    const uint32_t sk = sq + BR * HD * 2;
    const uint32_t sv = sk + BC * HD * 2;

    const int qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const __nv_bfloat16* qb = q + b * a.q_bs + h * a.q_hs;
    const __nv_bfloat16* kb = k + b * a.k_bs + h * a.k_hs;
    const __nv_bfloat16* vb = v + b * a.v_bs + h * a.v_hs;
    const int q0 = qt * BR;

    load_tile<NT>(sq, qb, a.q_ls, q0, BR, a.lq);
    load_tile<NT>(sk, kb, a.k_ls, 0, BC, a.lk);
    cp_commit();
    cp_wait<0>();
    __syncthreads();

    // Q fragments for this warp's 16 rows, 8 k-steps of 16 over the head dim.
    uint32_t qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        int r = warp * 16 + (lane & 15), c = 2 * kk + (lane >> 4);
        ldsm_x4(sq + swz(r, c), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
    }

    float acc[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

    const int ntiles = (a.lk + BC - 1) / BC;
    for (int j = 0; j < ntiles; ++j) {
        __syncthreads();  // everyone is done with V_{j-1}
        load_tile<NT>(sv, vb, a.v_ls, j * BC, BC, a.lk);
        cp_commit();
        cp_wait<1>();  // K_j has landed
        __syncthreads();

        float s[BC / 8][4];
#pragma unroll
        for (int i = 0; i < BC / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BC / 16; ++np) {
                int mi = lane >> 3;
                int r = np * 16 + (mi >> 1) * 8 + (lane & 7), c = 2 * kk + (mi & 1);
                uint32_t b0, b1, b2, b3;
                ldsm_x4(sk + swz(r, c), b0, b1, b2, b3);
                mma_bf16(s[2 * np], qf[kk], b0, b1);
                mma_bf16(s[2 * np + 1], qf[kk], b2, b3);
            }
        }

        if ((j + 1) * BC > a.lk) {  // partial last tile: mask keys >= lk
#pragma unroll
            for (int i = 0; i < BC / 8; ++i) {
                int key = j * BC + i * 8 + 2 * t4;
                if (key >= a.lk) { s[i][0] = -INFINITY; s[i][2] = -INFINITY; }
                if (key + 1 >= a.lk) { s[i][1] = -INFINITY; s[i][3] = -INFINITY; }
            }
        }

        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int i = 0; i < BC / 8; ++i) {
            mx0 = fmaxf(mx0, fmaxf(s[i][0], s[i][1]));
            mx1 = fmaxf(mx1, fmaxf(s[i][2], s[i][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float n0 = fmaxf(m0, mx0 * a.scale_log2), n1 = fmaxf(m1, mx1 * a.scale_log2);
        float c0 = exp2f(m0 - n0), c1 = exp2f(m1 - n1);  // m = -inf on the first tile: 0
        m0 = n0;
        m1 = n1;
        float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
        for (int i = 0; i < BC / 8; ++i) {
            s[i][0] = exp2f(s[i][0] * a.scale_log2 - n0);
            s[i][1] = exp2f(s[i][1] * a.scale_log2 - n0);
            s[i][2] = exp2f(s[i][2] * a.scale_log2 - n1);
            s[i][3] = exp2f(s[i][3] * a.scale_log2 - n1);
            rs0 += s[i][0] + s[i][1];
            rs1 += s[i][2] + s[i][3];
        }
        l0 = l0 * c0 + rs0;
        l1 = l1 * c1 + rs1;
#pragma unroll
        for (int i = 0; i < HD / 8; ++i) {
            acc[i][0] *= c0; acc[i][1] *= c0;
            acc[i][2] *= c1; acc[i][3] *= c1;
        }

        cp_wait<0>();  // V_j has landed
        __syncthreads();  // and every warp is done reading K_j
        if (j + 1 < ntiles) load_tile<NT>(sk, kb, a.k_ls, (j + 1) * BC, BC, a.lk);
        cp_commit();

#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            uint32_t pa[4];
            pa[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < HD / 16; ++dp) {
                int mi = lane >> 3;
                int r = kk * 16 + (mi & 1) * 8 + (lane & 7), c = 2 * dp + (mi >> 1);
                uint32_t b0, b1, b2, b3;
                ldsm_x4_t(sv + swz(r, c), b0, b1, b2, b3);
                mma_bf16(acc[2 * dp], pa, b0, b1);
                mma_bf16(acc[2 * dp + 1], pa, b2, b3);
            }
        }
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    __nv_bfloat16* ob = o + b * a.o_bs + h * a.o_hs;
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) {
        int d = i * 8 + 2 * t4;
        if (r0 < a.lq)
            *reinterpret_cast<__nv_bfloat162*>(ob + (int64_t)r0 * a.o_ls + d) =
                __floats2bfloat162_rn(acc[i][0] * inv0, acc[i][1] * inv0);
        if (r1 < a.lq)
            *reinterpret_cast<__nv_bfloat162*>(ob + (int64_t)r1 * a.o_ls + d) =
                __floats2bfloat162_rn(acc[i][2] * inv1, acc[i][3] * inv1);
    }
}

// Shared memory: (BR + 2·64) rows × 256 bytes; above 48 KB, so the launcher raises the limit.
extern "C" __global__ void __launch_bounds__(128, 2)
    lava_attn_fwd_bf16_d128_br64(AttnArgs a, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                 const __nv_bfloat16* v, __nv_bfloat16* o) {
    attn_body<64>(a, q, k, v, o);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    lava_attn_fwd_bf16_d128_br128(AttnArgs a, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                  const __nv_bfloat16* v, __nv_bfloat16* o) {
    attn_body<128>(a, q, k, v, o);
}
