/* qtypes.c - the per-type traits table (see qtypes.h). Adding a type means one entry here plus its
 * dequantizer (dequant.c), dot product (vecdot.c, SIMD in src/cpu/vecdot_*.c) and quantizer.
 * ggml_type_name / block size / bytes (src/gguf/gguf_types.c) read this table too. */
#include "cpu/kernels.h"
#include "quant/qtypes.h"
#include "quant/quantize.h"

#define BLOCK_TYPE(NAME, BS, BYTES) .name = NAME, .block_size = BS, .block_bytes = BYTES

static const forge_type_traits traits[GGML_TYPE_COUNT] = {
    [GGML_TYPE_F32] = {BLOCK_TYPE("F32", 1, 4), .dequantize_row = forge_dequant_row_f32,
        .quantize_row = quantize_row_f32,
                       .vec_dot_type = GGML_TYPE_F32, .cpu_tuned = true, .gpu = true},
    [GGML_TYPE_F16] = {BLOCK_TYPE("F16", 1, 2), .dequantize_row = forge_dequant_row_f16,
        .quantize_row = quantize_row_f16,
                       .vec_dot_type = GGML_TYPE_F16, .cpu_tuned = true, .gpu = true},
    [GGML_TYPE_BF16] = {BLOCK_TYPE("BF16", 1, 2), .dequantize_row = forge_dequant_row_bf16,
        .quantize_row = quantize_row_bf16,
                        .vec_dot_type = GGML_TYPE_BF16, .cpu_tuned = true, .gpu = true},
    /* fp16 d + 32 int8 */
    [GGML_TYPE_Q8_0] = {BLOCK_TYPE("Q8_0", 32, 34), .dequantize_row = forge_dequant_row_q8_0,
        .quantize_row = quantize_row_q8_0,
                        .vec_dot_type = GGML_TYPE_Q8_0, .cpu_tuned = true, .gpu = true},
    /* fp16 d + 16 nibble bytes */
    [GGML_TYPE_Q4_0] = {BLOCK_TYPE("Q4_0", 32, 18), .dequantize_row = forge_dequant_row_q4_0,
        .quantize_row = quantize_row_q4_0,
                        .vec_dot_type = GGML_TYPE_Q8_0, .cpu_tuned = true, .gpu = true},
    /* fp16 d, m + 16 nibble bytes */
    [GGML_TYPE_Q4_1] = {BLOCK_TYPE("Q4_1", 32, 20), .dequantize_row = forge_dequant_row_q4_1,
        .quantize_row = quantize_row_q4_1,
                        .vec_dot_type = GGML_TYPE_Q8_1, .quantize_act = forge_quantize_act_q8_1,
                        .vec_dot = forge_vec_dot_q4_1_q8_1,
                        .vec_dot_avx2 = FORGE_X86(forge_vec_dot_q4_1_q8_1_avx2), .gpu = true},
    /* fp16 d + 4 bytes of 5th bits + 16 nibble bytes */
    [GGML_TYPE_Q5_0] = {BLOCK_TYPE("Q5_0", 32, 22), .dequantize_row = forge_dequant_row_q5_0,
        .quantize_row = quantize_row_q5_0,
                        .vec_dot_type = GGML_TYPE_Q8_0, .quantize_act = forge_quantize_act_q8_0,
                        .vec_dot = forge_vec_dot_q5_0_q8_0,
                        .vec_dot_avx2 = FORGE_X86(forge_vec_dot_q5_0_q8_0_avx2), .gpu = true},
    [GGML_TYPE_Q5_1] = {BLOCK_TYPE("Q5_1", 32, 24), .dequantize_row = forge_dequant_row_q5_1,
        .quantize_row = quantize_row_q5_1,
                        .vec_dot_type = GGML_TYPE_Q8_1, .quantize_act = forge_quantize_act_q8_1,
                        .vec_dot = forge_vec_dot_q5_1_q8_1,
                        .vec_dot_avx2 = FORGE_X86(forge_vec_dot_q5_1_q8_1_avx2), .gpu = true},
    [GGML_TYPE_Q8_1] = {BLOCK_TYPE("Q8_1", 32, 36), .vec_dot_type = -1}, /* fp16 d, s + 32 int8 */
    [GGML_TYPE_Q2_K] = {BLOCK_TYPE("Q2_K", 256, 84), .dequantize_row = forge_dequant_row_q2_k,
        .quantize_row = quantize_row_q2_k,
                        .vec_dot_type = GGML_TYPE_Q8_K, .quantize_act = forge_quantize_act_q8_k,
                        .vec_dot = forge_vec_dot_q2_k_q8_k,
                        .vec_dot_avx2 = FORGE_X86(forge_vec_dot_q2_k_q8_k_avx2), .gpu = true},
    [GGML_TYPE_Q3_K] = {BLOCK_TYPE("Q3_K", 256, 110), .dequantize_row = forge_dequant_row_q3_k,
        .quantize_row = quantize_row_q3_k,
                        .vec_dot_type = GGML_TYPE_Q8_K, .quantize_act = forge_quantize_act_q8_k,
                        .vec_dot = forge_vec_dot_q3_k_q8_k,
                        .vec_dot_avx2 = FORGE_X86(forge_vec_dot_q3_k_q8_k_avx2), .gpu = true},
    [GGML_TYPE_Q4_K] = {BLOCK_TYPE("Q4_K", 256, 144), .dequantize_row = forge_dequant_row_q4_k,
        .quantize_row = quantize_row_q4_k,
                        .vec_dot_type = GGML_TYPE_Q8_K, .quantize_act = forge_quantize_act_q8_k,
                        .vec_dot = forge_vec_dot_q4_k_q8_k,
                        .vec_dot_avx2 = FORGE_X86(forge_vec_dot_q4_k_q8_k_avx2),
                        .vec_dot_avx512 = FORGE_X86(forge_vec_dot_q4_k_q8_k_avx512),
                        .vec_dot_x4_avx2 = FORGE_X86(forge_vec_dot_q4_k_q8_k_x4_avx2),
                        .vec_dot_r4_avx2 = FORGE_X86(forge_vec_dot_q4_k_q8_k_r4_avx2), .gpu = true},
    [GGML_TYPE_Q5_K] = {BLOCK_TYPE("Q5_K", 256, 176), .dequantize_row = forge_dequant_row_q5_k,
        .quantize_row = quantize_row_q5_k,
                        .vec_dot_type = GGML_TYPE_Q8_K, .quantize_act = forge_quantize_act_q8_k,
                        .vec_dot = forge_vec_dot_q5_k_q8_k,
                        .vec_dot_avx2 = FORGE_X86(forge_vec_dot_q5_k_q8_k_avx2), .gpu = true},
    [GGML_TYPE_Q6_K] = {BLOCK_TYPE("Q6_K", 256, 210), .dequantize_row = forge_dequant_row_q6_k,
        .quantize_row = quantize_row_q6_k,
                        .vec_dot_type = GGML_TYPE_Q8_K, .quantize_act = forge_quantize_act_q8_k,
                        .vec_dot = forge_vec_dot_q6_k_q8_k,
                        .vec_dot_avx2 = FORGE_X86(forge_vec_dot_q6_k_q8_k_avx2),
                        .vec_dot_avx512 = FORGE_X86(forge_vec_dot_q6_k_q8_k_avx512),
                        .vec_dot_x4_avx2 = FORGE_X86(forge_vec_dot_q6_k_q8_k_x4_avx2),
                        .vec_dot_r4_avx2 = FORGE_X86(forge_vec_dot_q6_k_q8_k_r4_avx2), .gpu = true},
    /* f32 d + 256 int8 + 16 int16 sums */
    [GGML_TYPE_Q8_K] = {BLOCK_TYPE("Q8_K", 256, 292), .vec_dot_type = -1},
    [GGML_TYPE_IQ2_XXS] = {BLOCK_TYPE("IQ2_XXS", 256, 66), .vec_dot_type = -1},
    [GGML_TYPE_IQ2_XS] = {BLOCK_TYPE("IQ2_XS", 256, 74), .vec_dot_type = -1},
    [GGML_TYPE_IQ3_XXS] = {BLOCK_TYPE("IQ3_XXS", 256, 98), .vec_dot_type = -1},
    [GGML_TYPE_IQ1_S] = {BLOCK_TYPE("IQ1_S", 256, 50), .vec_dot_type = -1},
    [GGML_TYPE_IQ4_NL] = {BLOCK_TYPE("IQ4_NL", 32, 18), .dequantize_row = forge_dequant_row_iq4_nl,
        .quantize_row = quantize_row_iq4_nl,
                          .vec_dot_type = GGML_TYPE_Q8_0, .quantize_act = forge_quantize_act_q8_0,
                          .vec_dot = forge_vec_dot_iq4_nl_q8_0,
                        .vec_dot_avx2 = FORGE_X86(forge_vec_dot_iq4_nl_q8_0_avx2), .gpu = true},
    [GGML_TYPE_IQ3_S] = {BLOCK_TYPE("IQ3_S", 256, 110), .vec_dot_type = -1},
    [GGML_TYPE_IQ2_S] = {BLOCK_TYPE("IQ2_S", 256, 82), .vec_dot_type = -1},
    [GGML_TYPE_IQ4_XS] = {BLOCK_TYPE("IQ4_XS", 256, 136), .dequantize_row = forge_dequant_row_iq4_xs,
        .quantize_row = quantize_row_iq4_xs,
                          .vec_dot_type = GGML_TYPE_Q8_K, .quantize_act = forge_quantize_act_q8_k,
                          .vec_dot = forge_vec_dot_iq4_xs_q8_k,
                        .vec_dot_avx2 = FORGE_X86(forge_vec_dot_iq4_xs_q8_k_avx2), .gpu = true},
    [GGML_TYPE_I8] = {BLOCK_TYPE("I8", 1, 1), .vec_dot_type = -1},
    [GGML_TYPE_I16] = {BLOCK_TYPE("I16", 1, 2), .vec_dot_type = -1},
    [GGML_TYPE_I32] = {BLOCK_TYPE("I32", 1, 4), .vec_dot_type = -1},
    [GGML_TYPE_I64] = {BLOCK_TYPE("I64", 1, 8), .vec_dot_type = -1},
    [GGML_TYPE_F64] = {BLOCK_TYPE("F64", 1, 8), .vec_dot_type = -1},
    [GGML_TYPE_IQ1_M] = {BLOCK_TYPE("IQ1_M", 256, 56), .vec_dot_type = -1},
    [GGML_TYPE_TQ1_0] = {BLOCK_TYPE("TQ1_0", 256, 54), .dequantize_row = forge_dequant_row_tq1_0,
                         .vec_dot_type = GGML_TYPE_Q8_K, .quantize_act = forge_quantize_act_q8_k,
                         .vec_dot = forge_vec_dot_tq1_0_q8_k, .gpu = true},
    [GGML_TYPE_TQ2_0] = {BLOCK_TYPE("TQ2_0", 256, 66), .dequantize_row = forge_dequant_row_tq2_0,
                         .vec_dot_type = GGML_TYPE_Q8_K, .quantize_act = forge_quantize_act_q8_k,
                         .vec_dot = forge_vec_dot_tq2_0_q8_k, .gpu = true},
    /* e8m0 scale + 16 nibble bytes */
    [GGML_TYPE_MXFP4] = {BLOCK_TYPE("MXFP4", 32, 17), .vec_dot_type = -1},
};

const forge_type_traits *forge_type_traits_get(int t)
{
    if (t < 0 || t >= GGML_TYPE_COUNT || traits[t].block_size <= 0) return NULL;
    return &traits[t];
}
