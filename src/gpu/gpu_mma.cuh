/* gpu_mma.cuh - the int8 tensor-core products, asynchronous copies and ldmatrix loads the
 * quantized kernels share (gpu_mmq.cu,
 * gpu_matvec_multi.cu): mma.sync on sm_80+, NVIDIA only (Debian's clang-15 HIP toolchain has no
 * counterpart; the callers keep their other path there). Fragment layouts (PTX ISA, s8, groupID
 * g = lane / 4, tig = lane % 4):
 *   m16n8k32: A a0 = row g, k 4tig..4tig+3; a1 = row g+8, same k; a2 / a3 = the same rows, k
 *             16+4tig..; B b0 = column g, k 4tig..4tig+3; b1 = column g, k 16+4tig..;
 *   m16n8k16: A a0 = row g, k 4tig..; a1 = row g+8; B b0 = column g, k 4tig..;
 *   D (both): d0 = (row g, column 2tig), d1 = (row g, 2tig+1), d2 / d3 = the same for row g+8.
 * Integer to float without a conversion instruction: the C operand is GPU_MMA_MAGIC_I (the float
 * 1.5 * 2^23), so D = s + GPU_MMA_MAGIC_I is the bit pattern of the float 1.5 * 2^23 + s for
 * |s| < 2^22, and gpu_mma_float(D) is s exactly. Internal. */
#ifndef FORGE_GPU_MMA_CUH
#define FORGE_GPU_MMA_CUH

#include "gpu/gpu_vendor.h"

#if !FORGE_GPU_HIP

#define GPU_MMA_MAGIC_I 0x4B400000 /* bits of 12582912.0f = 1.5 * 2^23 */
#define GPU_MMA_MAGIC_F 12582912.0f

/* the integer s of an mma result formed with the magic C operand, as a float (exact) */
GPU_DEV float gpu_mma_float(int d)
{
    return __int_as_float(d) - GPU_MMA_MAGIC_F;
}

/* d = a * b + GPU_MMA_MAGIC_I, 16 x 8 x 32 */
GPU_DEV void gpu_mma_k32(int (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1)
{
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(GPU_MMA_MAGIC_I));
}

/* d = a * b + GPU_MMA_MAGIC_I, 16 x 8 x 16 */
GPU_DEV void gpu_mma_k16(int (&d)[4], unsigned a0, unsigned a1, unsigned b0)
{
    asm("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%7,%7,%7,%7};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a0), "r"(a1), "r"(b0), "r"(GPU_MMA_MAGIC_I));
}

/* Four nibbles (one per byte, 0..15) -> four int8 (nibble - 8): +0x78 keeps every byte below
 * 0x88 (no carry into the next byte), the xor flips 0x78+n to n-8 in two's complement. */
GPU_DEV unsigned gpu_nib_s8(unsigned nib)
{
    return (nib + 0x78787878u) ^ 0x80808080u;
}

/* ---- asynchronous copies to shared memory, ldmatrix ---------------------------------------- */
GPU_DEV unsigned gpu_smem_addr(const void *p)
{
    return (unsigned)__cvta_generic_to_shared(p);
}

/* 16 bytes global -> shared, of which the first `bytes` (0..16) are read, the rest zero (src
 * must be a valid address even when nothing is read). */
GPU_DEV void gpu_cp16(void *dst, const void *src, int bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(gpu_smem_addr(dst)),
                 "l"(src), "r"(bytes)
                 : "memory");
}

/* 8 bytes, likewise (0..8 read) */
GPU_DEV void gpu_cp8(void *dst, const void *src, int bytes)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(gpu_smem_addr(dst)),
                 "l"(src), "r"(bytes)
                 : "memory");
}

/* 4 bytes, likewise (0, 2 or 4 read) */
GPU_DEV void gpu_cp4(void *dst, const void *src, int bytes)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(gpu_smem_addr(dst)),
                 "l"(src), "r"(bytes)
                 : "memory");
}

GPU_DEV void gpu_cp_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/* wait until at most N commit groups are pending */
template <int N> GPU_DEVT void gpu_cp_wait(void)
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* ldmatrix of 8x8 b16 matrices (8 rows of 16 bytes, row addresses from lanes 0-7, 8-15, ..):
 * lane l receives 32-bit word l % 4 of row l / 4 of each matrix */
GPU_DEV void gpu_ldsm_x4(unsigned (&r)[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(gpu_smem_addr(p))
                 : "memory");
}

GPU_DEV void gpu_ldsm_x2(unsigned &r0, unsigned &r1, const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r0), "=r"(r1)
                 : "r"(gpu_smem_addr(p))
                 : "memory");
}

GPU_DEV void gpu_ldsm_x1(unsigned &r0, const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r0)
                 : "r"(gpu_smem_addr(p))
                 : "memory");
}

#endif /* !FORGE_GPU_HIP */
#endif /* FORGE_GPU_MMA_CUH */
