/*
 * MXFP4 -> bf16 dequantization (SPEC §3).
 *
 * Every MXFP4 value FP4[code] * 2^(scale - 127) is exactly representable in bf16 (bf16 has fp32's exponent
 * range, including its subnormals, and FP4 magnitudes need at most 2 significant bits), so dequantization is
 * a pure table lookup: for each of the 256 scales, the 16 bf16 results, built once with integer arithmetic
 * (no float multiply, so an FTZ/DAZ mode set by some other library in the process cannot flush the
 * subnormal results that scales below 2 produce). The three paths differ only in how they do the lookup:
 *   AVX-512: one VPERMW per 32-value block (the block's 16-entry table sits in the low half of a zmm);
 *   AVX2:    VPSHUFB on the low and high bytes of the table, interleaved back into words;
 *   scalar:  two table reads per byte.
 * Sharing one table makes them bit-identical by construction; the tests compare each against numpy anyway.
 *
 * Out-of-range results: 2^128 and up (e.g. 2 * 2^127) overflow to +-inf, as an fp32 multiply would round them;
 * 1.5 * 2^127 is the largest finite value.
 * Scale 255 is NaN in E8M0 (OCP MX spec v1.0): every value of such a block becomes the quiet NaN 0x7fc0,
 * whatever its code (the sign of a NaN carries no meaning).
 */
#include "gptoss.h"

#include <immintrin.h>
#include <omp.h>

#include "bf16.h"
#include "internal.h"

enum { BLOCK_VALUES = 32, BLOCK_BYTES = 16, E8M0_NAN = 255, BF16_QNAN = 0x7fc0 };
enum { PREFETCH_BYTES = 8192, SCALES_PREFETCH_BYTES = 256 };

/* Below this much bf16 output, threads cost more to wake than they save (~10 us of work at 20 GB/s). */
#define PARALLEL_MIN_OUTPUT_BYTES ((size_t)256 * 1024)

/* lut[scale][code] = bf16 bits of FP4[code] * 2^(scale - 127); 8 KiB, hot rows stay in L1. Shared with
 * gemv.c (internal.h), which decodes blocks the same way. */
_Alignas(64) uint16_t gptoss_mxfp4_bf16_lut[256][16];
#define lut gptoss_mxfp4_bf16_lut

/*
 * bf16 bits of +mant * 2^e2 for mant in 1..15 and e2 >= -128 (all MXFP4 needs). Such a value has at most
 * 4 significant bits and is never below 2^-128, so it is exact in bf16: no rounding can happen, only
 * overflow to +inf.
 */
static uint16_t bf16_from_scaled_int(uint32_t mant, int e2) {
    if (mant == 0) return 0;
    int msb = 31 - __builtin_clz(mant);
    int biased = msb + e2 + 127; /* biased exponent of 1.f * 2^(msb + e2) */
    if (biased >= 255) return 0x7f80;
    if (biased >= 1) return (uint16_t)((biased << 7) | ((mant << (7 - msb)) & 0x7f));
    /* Subnormal: value = sig * 2^-133 (bf16's smallest step), sig = mant * 2^(e2 + 133) < 128. */
    return (uint16_t)(mant << (e2 + 133));
}

__attribute__((constructor)) static void init_lut(void) {
    /* FP4 magnitudes times 2: 0, 0.5, 1, 1.5, 2, 3, 4, 6 -> integers, so value = mant2 * 2^(scale - 128). */
    static const uint32_t mant2[8] = {0, 1, 2, 3, 4, 6, 8, 12};
    for (int s = 0; s < 256; s++) {
        for (int code = 0; code < 16; code++) {
            uint16_t mag = bf16_from_scaled_int(mant2[code & 7], s - 128);
            lut[s][code] = s == E8M0_NAN ? BF16_QNAN : (uint16_t)(mag | ((code & 8) ? 0x8000 : 0));
        }
    }
}

/* ---------------------------------------------------------------- per-ISA block loops */

/* Each loop dequantizes n_blocks consecutive blocks (rows are contiguous, so a row range is one run). */

static void dequant_scalar(const uint8_t *blocks, const uint8_t *scales, size_t n_blocks, uint16_t *out) {
    for (size_t b = 0; b < n_blocks; b++) {
        const uint16_t *t = lut[scales[b]];
        const uint8_t *q = blocks + b * BLOCK_BYTES;
        uint16_t *o = out + b * BLOCK_VALUES;
        for (int j = 0; j < BLOCK_BYTES; j++) {
            o[2 * j] = t[q[j] & 15];
            o[2 * j + 1] = t[q[j] >> 4];
        }
    }
}

__attribute__((target("avx2"))) static void dequant_avx2(const uint8_t *blocks, const uint8_t *scales,
                                                          size_t n_blocks, uint16_t *out) {
    const __m128i nibble = _mm_set1_epi8(0x0f);
    /* Gathers the low (even) and high (odd) bytes of 16 words into two 8-byte halves. */
    const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (size_t b = 0; b < n_blocks; b++) {
        __m128i q = _mm_loadu_si128((const __m128i *)(blocks + b * BLOCK_BYTES));
        __m128i lo = _mm_and_si128(q, nibble);
        __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), nibble);
        /* Value order: byte j gives values 2j (low nibble) and 2j+1 (high nibble). */
        __m256i idx = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
        /* The 16-word table as 16 low bytes and 16 high bytes, in both 128-bit lanes. */
        const __m128i *t = (const __m128i *)lut[scales[b]];
        __m128i t0 = _mm_shuffle_epi8(_mm_load_si128(t), split);     /* lo bytes 0-7 | hi bytes 0-7 */
        __m128i t1 = _mm_shuffle_epi8(_mm_load_si128(t + 1), split); /* lo bytes 8-15 | hi bytes 8-15 */
        __m256i tlo = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(t0, t1));
        __m256i thi = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(t0, t1));
        __m256i vlo = _mm256_shuffle_epi8(tlo, idx);
        __m256i vhi = _mm256_shuffle_epi8(thi, idx);
        /* lane 0 holds values 0-15, lane 1 values 16-31; unpack interleaves within lanes. */
        __m256i w0 = _mm256_unpacklo_epi8(vlo, vhi); /* values 0-7 | 16-23 */
        __m256i w1 = _mm256_unpackhi_epi8(vlo, vhi); /* values 8-15 | 24-31 */
        __m256i *o = (__m256i *)(out + b * BLOCK_VALUES);
        _mm256_storeu_si256(o, _mm256_permute2x128_si256(w0, w1, 0x20));
        _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(w0, w1, 0x31));
    }
}

/*
 * One block: its 16 bytes zero-extended to 16 dwords, dword j = byte j. (d | d << 12) & 0x000f000f puts the
 * low nibble in the dword's low word and the high nibble in its high word: the 32 word indices in value
 * order, ready for VPERMW.
 */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __m512i block_avx512(const uint8_t *q,
                                                                                      const uint16_t *table) {
    const __m512i nibbles = _mm512_set1_epi32(0x000f000f);
    __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    __m512i idx = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), nibbles, 0xa8); /* (a | b) & c */
    /* Indices are < 16, so only the table's low 256 bits are ever selected. */
    return _mm512_permutexvar_epi16(idx, _mm512_zextsi256_si512(_mm256_load_si256((const __m256i *)table)));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void dequant_avx512(const uint8_t *blocks,
                                                                                const uint8_t *scales,
                                                                                size_t n_blocks, uint16_t *out) {
    size_t b = 0;
    /* Four blocks = one 64-byte line of input per iteration. The input usually comes from DRAM (an expert
     * just read from disk) and a software prefetch measured 10-20% faster than leaving it to the hardware
     * prefetchers, which stop at every 4 KiB page. The loop runs at ~1 ns per block from cache, so 1 KiB
     * ahead into L1 is less than one DRAM latency ahead: 8 KiB ahead into L2 measured 1.16-1.35 ns per block
     * against 1.59-1.71 (one thread, 360-row tiles of a 66 MB source, alternating runs; 2 KiB and 4 KiB into
     * L1 or with NTA, and 16 KiB into L2, in between), and ~8% less time per 20b expert at M=1, 2 threads. */
    for (; b + 4 <= n_blocks; b += 4) {
        _mm_prefetch((const char *)(blocks + b * BLOCK_BYTES + PREFETCH_BYTES), _MM_HINT_T1);
        if (b % 64 == 0) _mm_prefetch((const char *)(scales + b + SCALES_PREFETCH_BYTES), _MM_HINT_T0);
        for (size_t j = b; j < b + 4; j += 2) {
            __m512i v0 = block_avx512(blocks + j * BLOCK_BYTES, lut[scales[j]]);
            __m512i v1 = block_avx512(blocks + (j + 1) * BLOCK_BYTES, lut[scales[j + 1]]);
            _mm512_storeu_si512(out + j * BLOCK_VALUES, v0);
            _mm512_storeu_si512(out + (j + 1) * BLOCK_VALUES, v1);
        }
    }
    for (; b < n_blocks; b++)
        _mm512_storeu_si512(out + b * BLOCK_VALUES, block_avx512(blocks + b * BLOCK_BYTES, lut[scales[b]]));
}

typedef void (*dequant_fn)(const uint8_t *, const uint8_t *, size_t, uint16_t *);

static dequant_fn select_kernel(void) {
    switch (gptoss_get_isa()) {
    case GPTOSS_ISA_AVX512: return dequant_avx512;
    case GPTOSS_ISA_AVX2: return dequant_avx2;
    default: return dequant_scalar;
    }
}

/* ---------------------------------------------------------------- entry points */

/* Unchecked, single-threaded: n_blocks consecutive blocks (gemv.c dequantizes a chunk of a row at a time). */
void gptoss_dequantize_mxfp4_blocks(const uint8_t *blocks, const uint8_t *scales, size_t n_blocks,
                                    gptoss_bf16 *out) {
    select_kernel()(blocks, scales, n_blocks, out);
}

/* Unchecked, single-threaded: for matmul.c, which validates once and dequantizes tile by tile. */
void gptoss_dequantize_mxfp4_unchecked(const uint8_t *blocks, const uint8_t *scales, size_t blocks_per_row,
                                        size_t row_begin, size_t row_end, gptoss_bf16 *out) {
    size_t first = row_begin * blocks_per_row;
    select_kernel()(blocks + first * BLOCK_BYTES, scales + first, (row_end - row_begin) * blocks_per_row, out);
}

GPTOSS_API int gptoss_dequantize_mxfp4_rows(const uint8_t *blocks, const uint8_t *scales, size_t n_rows,
                                            size_t blocks_per_row, size_t row_begin, size_t row_end,
                                            gptoss_bf16 *out) {
    if (!blocks || !scales || !out) return GPTOSS_ERR_NULL_POINTER;
    if (n_rows == 0 || blocks_per_row == 0) return GPTOSS_ERR_BAD_SIZE;
    /* The largest byte count we index with is the bf16 output of all n_rows rows: it must fit a size_t. */
    size_t total_blocks, total_out_bytes;
    if (__builtin_mul_overflow(n_rows, blocks_per_row, &total_blocks) ||
        __builtin_mul_overflow(total_blocks, (size_t)BLOCK_VALUES * sizeof(gptoss_bf16), &total_out_bytes))
        return GPTOSS_ERR_BAD_SIZE;
    if (row_begin > row_end || row_end > n_rows) return GPTOSS_ERR_OUT_OF_RANGE;
    size_t n_blocks = (row_end - row_begin) * blocks_per_row;
    if (n_blocks == 0) return GPTOSS_OK; /* an empty range is valid and writes nothing */

    const uint8_t *q = blocks + row_begin * blocks_per_row * BLOCK_BYTES;
    const uint8_t *s = scales + row_begin * blocks_per_row;
    dequant_fn kernel = select_kernel();
    int threads = gptoss_get_num_threads();
    if (threads <= 1 || n_blocks * BLOCK_VALUES * sizeof(gptoss_bf16) < PARALLEL_MIN_OUTPUT_BYTES) {
        kernel(q, s, n_blocks, out);
        return GPTOSS_OK;
    }
    /* Equal contiguous chunks, split on 32-block (2 KiB of output) boundaries so no two threads share a line. */
    size_t chunk_align = 32;
    #pragma omp parallel num_threads(threads)
    {
        size_t nthr = (size_t)omp_get_num_threads(), ithr = (size_t)omp_get_thread_num();
        size_t per = (n_blocks + nthr - 1) / nthr;
        per = (per + chunk_align - 1) / chunk_align * chunk_align;
        size_t begin = ithr * per < n_blocks ? ithr * per : n_blocks;
        size_t end = begin + per < n_blocks ? begin + per : n_blocks;
        if (end > begin) kernel(q + begin * BLOCK_BYTES, s + begin, end - begin, out + begin * BLOCK_VALUES);
    }
    return GPTOSS_OK;
}
