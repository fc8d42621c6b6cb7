/*
 * Matmuls: y = x W^T (+ b), bf16 inputs, fp32 accumulation, bf16 or fp32 output.
 *
 * Two compute paths (runtime.c chooses):
 *  - bf16 (AVX512_BF16): oneDNN's bf16 matmul, weights used in place.
 *  - fp32 (AVX2, scalar; oneDNN 3.2 cannot multiply bf16 there): m <= GEMV_MAX_ROWS goes to gemv.c, which
 *    reads every weight once and widens it in registers; larger m widens x once and W one L2-sized tile at a
 *    time to fp32 and runs oneDNN's fp32 GEMM on each tile, then adds the bias and rounds. Weights stay bf16
 *    or MXFP4 in memory: only a tile per thread ever exists in fp32.
 *
 * W stays where the checkpoint put it, [n, k] row-major: to oneDNN that is a [k, n] weights tensor with
 * strides {1, k} (format "ba"), so no reorder and no copy of the weights is ever made by us. x and y may be
 * column slices of wider matrices (row strides ldx, ldy).
 *
 * Global state (the only global state besides runtime.c's settings, see gptoss.h):
 *  - one oneDNN CPU engine, created on first use and kept for the life of the process;
 *  - a cache of matmul primitives, a fixed array of CACHE_CAPACITY entries searched linearly (a handful of
 *    shapes per model: a hash would buy nothing) and evicted least-recently-used. The key is the shape
 *    (m, n, k, ldx, ldy), whether there is a bias, the output dtype, and the thread count the primitive was
 *    planned for: oneDNN splits work for the thread count it sees at creation, so a primitive must not
 *    outlive a gptoss_set_num_threads() change;
 *  - per-lane execution state (a stream and a scratchpad buffer per concurrently running tile; lane 0 serves
 *    plain calls; on the fp32 path also the lane's fp32 weight tile and product tile) and the fp32 copy of
 *    the current call's x; all grow to the largest size asked for and live until gptoss_matmul_cache_clear(). Primitives are created in "user scratchpad" mode so that two threads can execute the same
 *    primitive at once with their own scratchpads (oneDNN's library-managed scratchpad is shared between
 *    every primitive created on one thread, so concurrent execution would race on it).
 * A mutex serialises the public entry points, so concurrent callers are safe, merely not concurrent.
 */
#include "gptoss.h"

#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "internal.h"

enum { CACHE_CAPACITY = 64 };

/* The memory arguments of a matmul, indexing cache_entry.md and .mem. */
enum { MD_SRC, MD_WEIGHTS, MD_BIAS, MD_DST, MD_SCRATCHPAD, MD_COUNT };

/*
 * Dequantized weight tile of gptoss_matmul_mxfp4 when the caller leaves tile_rows = 0. Measured at M=1 on
 * [5760, 2880] and [2880, 2880] (Zen4, 1 MiB L2 per core, 32 MiB L3; tools/bench_kernels.py --mxfp4-modes),
 * 2 threads with parallel tiles: 64 rows (368 KiB) 8.8 GB/s of MXFP4, 128 rows 10-11, 256-720 rows 11-12.
 * Past ~1 MiB the tile no longer fits L2 but the shared L3 serves the read-back just as well, while every
 * extra tile costs a oneDNN call (~1-2 us) and a short GEMV runs below its best rate. 2 MiB per thread still
 * leaves most of any L3 to everything else.
 */
#define DEFAULT_TILE_BYTES ((size_t)2 << 20)
/* fp32 weight tile per thread on the fp32 path (tools/bench_kernels.py; Zen 2 has 512 KiB of L2 per core). */
#define DEFAULT_F32_TILE_BYTES ((size_t)1 << 20)
/* Below this many weights a small-m product runs on one thread: waking the others costs more. */
#define GEMV_PARALLEL_MIN_WEIGHTS ((size_t)1 << 16)

typedef struct {
    size_t m, n, k, ldx, ldy;
    int has_bias, y_dtype, threads;
    int f32; /* fp32 x and W (the fp32 path's tiles) instead of bf16 */
} matmul_key;

typedef struct {
    matmul_key key;
    dnnl_primitive_t primitive; /* NULL: free slot */
    dnnl_memory_desc_t md[MD_COUNT];
    size_t scratchpad_bytes;
    uint64_t last_use;
    /* Memory objects [mem_lanes][MD_COUNT], one set per lane, re-pointed at each call's buffers: creating
     * them per call cost ~0.5 us each, a third of a small GEMV's time. */
    dnnl_memory_t *mem;
    size_t mem_lanes;
} cache_entry;

typedef struct {
    dnnl_stream_t stream;
    void *scratchpad;
    size_t scratchpad_bytes;
    float *w_tile, *y_tile; /* fp32 path: the widened weight tile and its product before bias and rounding */
    size_t w_tile_elems, y_tile_elems;
} lane;

static pthread_mutex_t matmul_lock = PTHREAD_MUTEX_INITIALIZER;
static dnnl_engine_t engine;
static cache_entry cache[CACHE_CAPACITY];
static uint64_t use_clock;
static lane *lanes;
static size_t n_lanes;
static float *x_f32;
static size_t x_f32_elems;

/* ---------------------------------------------------------------- oneDNN objects */

static int ensure_engine(void) {
    if (engine) return GPTOSS_OK;
    return dnnl_engine_create(&engine, dnnl_cpu, 0) == dnnl_success ? GPTOSS_OK : GPTOSS_ERR_ONEDNN;
}

static void destroy_entry(cache_entry *e) {
    for (size_t i = 0; i < e->mem_lanes * MD_COUNT; i++)
        if (e->mem[i]) dnnl_memory_destroy(e->mem[i]);
    free(e->mem);
    if (e->primitive) dnnl_primitive_destroy(e->primitive);
    for (int i = 0; i < MD_COUNT; i++)
        if (e->md[i]) dnnl_memory_desc_destroy(e->md[i]);
    memset(e, 0, sizeof *e);
}

static int make_md(dnnl_memory_desc_t *md, size_t rows, size_t cols, size_t row_stride, size_t col_stride,
                   dnnl_data_type_t dtype) {
    dnnl_dims_t dims = {(dnnl_dim_t)rows, (dnnl_dim_t)cols};
    dnnl_dims_t strides = {(dnnl_dim_t)row_stride, (dnnl_dim_t)col_stride};
    return dnnl_memory_desc_create_with_strides(md, 2, dims, dtype, strides) == dnnl_success ? GPTOSS_OK
                                                                                              : GPTOSS_ERR_ONEDNN;
}

/*
 * Implementation choice. oneDNN 3.2 ranks its brgemm matmul first, and with W in [n, k] ("ba") layout brgemm
 * first repacks W into its VNNI blocks and then multiplies: for a single row of x the repacking costs as
 * much as the product, so an M=1 matmul runs at about half the memory bandwidth. oneDNN's "gemm:jit" matmul
 * has a GEMV kernel that streams W once. Measured on [5760, 2880], 1 thread, W from DRAM: M=1 gemm:jit
 * 14.9 GB/s, brgemm 9.9; M=2 gemm:jit 5.3, brgemm 10.3 (it has no GEMV path there). So gemm:jit is
 * preferred for m <= GEMV_MAX_M only.
 */
enum { GEMV_MAX_M = 1 };

/* Moves pd to the first implementation whose name starts with prefix; 0 (pd exhausted) if there is none. */
static int select_impl(dnnl_primitive_desc_t pd, const char *prefix) {
    do {
        const char *name = NULL;
        if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name) == dnnl_success && name &&
            strncmp(name, prefix, strlen(prefix)) == 0)
            return 1;
    } while (dnnl_primitive_desc_next_impl(pd) == dnnl_success);
    return 0;
}

/* Builds the primitive for key into e (which must be zeroed); on failure e is left zeroed. */
static int create_entry(cache_entry *e, const matmul_key *key) {
    const matmul_key K = *key;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t pd = NULL;
    int status = GPTOSS_ERR_ONEDNN;
    e->key = K;
    dnnl_data_type_t y_type = K.y_dtype == GPTOSS_DTYPE_F32 ? dnnl_f32 : dnnl_bf16;
    dnnl_data_type_t in_type = K.f32 ? dnnl_f32 : dnnl_bf16;
    if (make_md(&e->md[MD_SRC], K.m, K.k, K.ldx, 1, in_type) ||
        make_md(&e->md[MD_WEIGHTS], K.k, K.n, 1, K.k, in_type) || /* W[n, k] seen as "ba" [k, n] */
        (K.has_bias && make_md(&e->md[MD_BIAS], 1, K.n, K.n, 1, dnnl_bf16)) ||
        make_md(&e->md[MD_DST], K.m, K.n, K.ldy, 1, y_type))
        goto fail;
    if (dnnl_primitive_attr_create(&attr) != dnnl_success ||
        dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user) != dnnl_success)
        goto fail;
    /* oneDNN plans its thread split for omp_get_max_threads() at creation time: make that key.threads. */
    int saved_threads = omp_get_max_threads();
    if (saved_threads != K.threads) omp_set_num_threads(K.threads);
    dnnl_status_t st = dnnl_matmul_primitive_desc_create(&pd, engine, e->md[MD_SRC], e->md[MD_WEIGHTS],
                                                         e->md[MD_BIAS], e->md[MD_DST], attr);
    if (st == dnnl_success && !K.f32 && K.m <= GEMV_MAX_M && !select_impl(pd, "gemm:jit")) {
        /* No GEMV-capable implementation: start over with oneDNN's first choice. */
        dnnl_primitive_desc_destroy(pd);
        pd = NULL;
        st = dnnl_matmul_primitive_desc_create(&pd, engine, e->md[MD_SRC], e->md[MD_WEIGHTS], e->md[MD_BIAS],
                                               e->md[MD_DST], attr);
    }
    if (st == dnnl_success) st = dnnl_primitive_create(&e->primitive, pd);
    if (saved_threads != K.threads) omp_set_num_threads(saved_threads);
    if (st != dnnl_success) goto fail;
    const_dnnl_memory_desc_t scratch_md = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    e->scratchpad_bytes = scratch_md ? dnnl_memory_desc_get_size(scratch_md) : 0;
    if (e->scratchpad_bytes && dnnl_memory_desc_clone(&e->md[MD_SCRATCHPAD], scratch_md) != dnnl_success) goto fail;
    status = GPTOSS_OK;
fail:
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (attr) dnnl_primitive_attr_destroy(attr);
    if (status != GPTOSS_OK) destroy_entry(e);
    return status;
}

static int same_key(const matmul_key *a, const matmul_key *b) {
    return a->m == b->m && a->n == b->n && a->k == b->k && a->ldx == b->ldx && a->ldy == b->ldy &&
           a->has_bias == b->has_bias && a->y_dtype == b->y_dtype && a->threads == b->threads && a->f32 == b->f32;
}

/* The cached primitive for key, created (evicting the least recently used entry) if needed. */
static int get_primitive(const matmul_key *key, cache_entry **out) {
    int status = ensure_engine();
    if (status) return status;
    cache_entry *victim = &cache[0];
    for (int i = 0; i < CACHE_CAPACITY; i++) {
        cache_entry *e = &cache[i];
        if (e->primitive && same_key(&e->key, key)) {
            e->last_use = ++use_clock;
            *out = e;
            return GPTOSS_OK;
        }
        if (!e->primitive) {
            if (victim->primitive) victim = e; /* prefer a free slot */
        } else if (victim->primitive && e->last_use < victim->last_use) {
            victim = e;
        }
    }
    destroy_entry(victim);
    status = create_entry(victim, key);
    if (status) return status;
    victim->last_use = ++use_clock;
    *out = victim;
    return GPTOSS_OK;
}

/* e has memory objects for lanes 0..count-1. On failure e is left as it was (no lane half-made, so a later
 * call retries instead of failing on a NULL memory object). */
static int ensure_entry_lanes(cache_entry *e, size_t count) {
    if (count <= e->mem_lanes) return GPTOSS_OK;
    dnnl_memory_t *grown = realloc(e->mem, count * MD_COUNT * sizeof *grown);
    if (!grown) return GPTOSS_ERR_NO_MEMORY;
    e->mem = grown;
    size_t first = e->mem_lanes * MD_COUNT, end = count * MD_COUNT;
    memset(grown + first, 0, (end - first) * sizeof *grown);
    for (size_t i = first; i < end; i++) {
        int md = (int)(i % MD_COUNT);
        if (e->md[md] && dnnl_memory_create(&grown[i], e->md[md], engine, DNNL_MEMORY_NONE) != dnnl_success) {
            for (size_t j = first; j < end; j++)
                if (grown[j]) dnnl_memory_destroy(grown[j]);
            memset(grown + first, 0, (end - first) * sizeof *grown);
            return GPTOSS_ERR_ONEDNN;
        }
    }
    e->mem_lanes = count;
    return GPTOSS_OK;
}

/* *buf holds at least elems floats (64-byte aligned), grown if need be. */
static int ensure_floats(float **buf, size_t *have, size_t elems) {
    if (elems <= *have) return GPTOSS_OK;
    void *p = NULL;
    if (posix_memalign(&p, 64, (elems + 15) / 16 * 16 * sizeof(float))) return GPTOSS_ERR_NO_MEMORY;
    free(*buf);
    *buf = p;
    *have = elems;
    return GPTOSS_OK;
}

/* Lanes 0..count-1 exist and each has a scratchpad of at least bytes. */
static int ensure_lanes(size_t count, size_t bytes) {
    if (count > n_lanes) {
        lane *grown = realloc(lanes, count * sizeof *lanes);
        if (!grown) return GPTOSS_ERR_NO_MEMORY;
        memset(grown + n_lanes, 0, (count - n_lanes) * sizeof *lanes);
        lanes = grown;
        n_lanes = count;
    }
    for (size_t i = 0; i < count; i++) {
        lane *l = &lanes[i];
        if (!l->stream && dnnl_stream_create(&l->stream, engine, dnnl_stream_in_order) != dnnl_success) {
            l->stream = NULL;
            return GPTOSS_ERR_ONEDNN;
        }
        if (bytes > l->scratchpad_bytes) {
            void *p = NULL;
            size_t rounded = (bytes + 63) / 64 * 64;
            if (posix_memalign(&p, 64, rounded)) return GPTOSS_ERR_NO_MEMORY;
            free(l->scratchpad);
            l->scratchpad = p;
            l->scratchpad_bytes = rounded;
        }
    }
    return GPTOSS_OK;
}

/* Runs e's primitive on the given buffers with lane lane_id's memory objects, stream and scratchpad. Safe to
 * call from several threads at once with distinct lanes. */
static int execute(const cache_entry *e, size_t lane_id, const void *x, const void *w, const void *bias, void *y) {
    static const int arg_kind[MD_COUNT] = {
        [MD_SRC] = DNNL_ARG_SRC, [MD_WEIGHTS] = DNNL_ARG_WEIGHTS, [MD_BIAS] = DNNL_ARG_BIAS,
        [MD_DST] = DNNL_ARG_DST, [MD_SCRATCHPAD] = DNNL_ARG_SCRATCHPAD};
    lane *l = &lanes[lane_id];
    void *handle[MD_COUNT] = {[MD_SRC] = (void *)x, [MD_WEIGHTS] = (void *)w, [MD_BIAS] = (void *)bias,
                              [MD_DST] = y, [MD_SCRATCHPAD] = l->scratchpad};
    dnnl_memory_t *mem = &e->mem[lane_id * MD_COUNT];
    dnnl_exec_arg_t args[MD_COUNT];
    int nargs = 0;
    for (int i = MD_SRC; i < MD_COUNT; i++) {
        if (!e->md[i]) continue;
        if (dnnl_memory_set_data_handle(mem[i], handle[i]) != dnnl_success) return GPTOSS_ERR_ONEDNN;
        args[nargs].arg = arg_kind[i];
        args[nargs].memory = mem[i];
        nargs++;
    }
    if (dnnl_primitive_execute(e->primitive, l->stream, nargs, args) != dnnl_success ||
        dnnl_stream_wait(l->stream) != dnnl_success)
        return GPTOSS_ERR_ONEDNN;
    return GPTOSS_OK;
}

/* ---------------------------------------------------------------- validation helpers */

/* Bytes spanned by `rows` rows of `cols` elements with row stride ld; 0 on overflow or beyond PTRDIFF_MAX
 * (oneDNN dims and offsets are signed 64-bit). rows, cols >= 1 and ld >= cols are checked by the caller. */
static size_t span_bytes(size_t rows, size_t cols, size_t ld, size_t elem) {
    size_t elems, bytes;
    if (__builtin_mul_overflow(rows - 1, ld, &elems) || __builtin_add_overflow(elems, cols, &elems) ||
        __builtin_mul_overflow(elems, elem, &bytes) || bytes > (size_t)PTRDIFF_MAX)
        return 0;
    return bytes;
}

/* The primitives of a tiled product: one for a full tile, one for the last (possibly shorter) tile, both with
 * memory objects for n_par lanes and every lane's scratchpad large enough. Caller holds matmul_lock. */
static int get_tile_primitives(const matmul_key *full_key, const matmul_key *last_key, size_t n_par,
                               cache_entry **full, cache_entry **last) {
    int status = get_primitive(full_key, full);
    /* This lookup cannot evict `full`: it was used last and LRU evicts the least recently used entry. */
    if (!status) status = get_primitive(last_key, last);
    if (!status) {
        size_t pad = (*full)->scratchpad_bytes > (*last)->scratchpad_bytes ? (*full)->scratchpad_bytes
                                                                            : (*last)->scratchpad_bytes;
        status = ensure_lanes(n_par, pad);
    }
    if (!status) status = ensure_entry_lanes(*full, n_par);
    if (!status) status = ensure_entry_lanes(*last, n_par);
    return status;
}

/* ---------------------------------------------------------------- fp32 compute path */

/* Rows [r0, r1) of W, widened to fp32 into out ([r1 - r0, k]). */
typedef struct {
    const gptoss_bf16 *bf16;                /* W [n, k] bf16, or NULL for MXFP4 / q8 */
    const uint8_t *blocks, *scales;         /* W [n, k] MXFP4 */
    const int8_t *q8;                       /* W [n, k] q8 (q8.c), with its fp16 scales [n, k / 32] */
    const uint16_t *q8_scales;
} weights_ref;

static void widen_weight_rows(const weights_ref *w, size_t k, size_t r0, size_t r1, float *out) {
    enum { CHUNK = 1024 };
    if (w->bf16) {
        const gptoss_bf16 *src = w->bf16 + r0 * k;
        for (size_t i = 0, n = (r1 - r0) * k; i < n; i++) out[i] = bf16_to_f32(src[i]);
        return;
    }
    if (w->q8) {
        gptoss_widen_q8_rows(w->q8, w->q8_scales, k, r0, r1, out); /* exact: q * scale fits fp32 */
        return;
    }
    /* MXFP4 -> bf16 (the exact table of mxfp4.c) a chunk at a time in L1, then -> fp32. */
    _Alignas(64) gptoss_bf16 chunk[CHUNK];
    size_t n_blocks = (r1 - r0) * k / 32;
    const uint8_t *q = w->blocks + r0 * (k / 32) * 16, *sc = w->scales + r0 * (k / 32);
    for (size_t b = 0; b < n_blocks; b += CHUNK / 32) {
        size_t nb = n_blocks - b < CHUNK / 32 ? n_blocks - b : CHUNK / 32;
        gptoss_dequantize_mxfp4_blocks(q + b * 16, sc + b, nb, chunk);
        for (size_t i = 0; i < nb * 32; i++) out[b * 32 + i] = bf16_to_f32(chunk[i]);
    }
}

/* y[:, r0:r0+rows] = bias + y_tile, rounded to y's dtype. */
static void store_tile(const float *y_tile, size_t m, size_t rows, const gptoss_bf16 *bias, size_t r0, void *y,
                       size_t ldy, int y_dtype) {
    for (size_t t = 0; t < m; t++)
        for (size_t r = 0; r < rows; r++) {
            float v = y_tile[t * rows + r] + (bias ? bf16_to_f32(bias[r0 + r]) : 0.0f);
            if (y_dtype == GPTOSS_DTYPE_F32)
                ((float *)y)[t * ldy + r0 + r] = v;
            else
                ((gptoss_bf16 *)y)[t * ldy + r0 + r] = f32_to_bf16(v);
        }
}

/* x [m, k] (row stride ldx) into the fp32 buffer x_f32 [m, k]; with deinterleave, each block of 32 values
 * in the order gptoss_gemv_mxfp4_rows wants (even positions, then odd). */
static int widen_x(const gptoss_bf16 *x, size_t m, size_t k, size_t ldx, int deinterleave) {
    int status = ensure_floats(&x_f32, &x_f32_elems, m * k);
    if (status) return status;
    for (size_t t = 0; t < m; t++) {
        const gptoss_bf16 *src = x + t * ldx;
        float *dst = x_f32 + t * k;
        if (!deinterleave) {
            for (size_t i = 0; i < k; i++) dst[i] = bf16_to_f32(src[i]);
            continue;
        }
        for (size_t b = 0; b < k; b += 32)
            for (size_t j = 0; j < 16; j++) {
                dst[b + j] = bf16_to_f32(src[b + 2 * j]);
                dst[b + 16 + j] = bf16_to_f32(src[b + 2 * j + 1]);
            }
    }
    return GPTOSS_OK;
}

/* Rows of W per thread for gemv.c's kernels: whole groups of 4 (every thread runs the register-blocked
 * loop), one thread for small products. Returns the number of parts. */
static size_t gemv_split(size_t n, size_t k, size_t *per) {
    size_t threads = (size_t)gptoss_get_num_threads();
    if (n * k < GEMV_PARALLEL_MIN_WEIGHTS) threads = 1;
    *per = ((n + threads - 1) / threads + 3) / 4 * 4;
    return (n + *per - 1) / *per;
}

/* m <= GEMV_MAX_ROWS: gemv.c's kernels, rows of W shared out between threads. Caller holds matmul_lock. */
static int f32_gemv(size_t m, size_t k, const weights_ref *w, size_t n, const gptoss_bf16 *bias, void *y,
                    size_t ldy, int y_dtype) {
    size_t per, parts = gemv_split(n, k, &per);
    #pragma omp parallel for num_threads((int)parts) schedule(static) if (parts > 1)
    for (size_t p = 0; p < parts; p++) {
        size_t r0 = p * per, r1 = r0 + per < n ? r0 + per : n;
        if (w->bf16)
            gptoss_gemv_bf16_rows(x_f32, m, k, w->bf16, bias, r0, r1, y, ldy, y_dtype);
        else if (w->q8)
            gptoss_gemv_q8_rows(x_f32, m, k, w->q8, w->q8_scales, bias, r0, r1, y, ldy, y_dtype);
        else
            gptoss_gemv_mxfp4_rows(x_f32, m, k, w->blocks, w->scales, bias, r0, r1, y, ldy);
    }
    return GPTOSS_OK;
}

/* n rows of W in tiles of about `target` rows, as many tiles as a multiple of the thread count (a balanced
 * static split); the last tile may be shorter. n_par: tiles that run at once. */
static void split_tiles(size_t n, size_t target, size_t threads, size_t *rows, size_t *n_tiles, size_t *last_rows,
                        size_t *n_par) {
    if (target == 0) target = 1;
    size_t tiles = (n + target - 1) / target;
    tiles = (tiles + threads - 1) / threads * threads;
    *rows = (n + tiles - 1) / tiles;
    *n_tiles = (n + *rows - 1) / *rows;
    *last_rows = n - (*n_tiles - 1) * *rows;
    *n_par = threads < *n_tiles ? threads : *n_tiles;
}

/*
 * m > GEMV_MAX_ROWS: W widened one tile of about DEFAULT_F32_TILE_BYTES at a time, each tile multiplied by
 * oneDNN's fp32 GEMM while it is in cache. Tiles are shared out between threads as in gptoss_matmul_mxfp4
 * below (each thread widens and multiplies its own tiles, oneDNN single-threaded on them); a single tile
 * runs with all threads inside oneDNN. Caller holds matmul_lock and has filled x_f32.
 */
static int f32_tiled(size_t m, size_t k, const weights_ref *w, size_t n, const gptoss_bf16 *bias, void *y,
                     size_t ldy, int y_dtype) {
    size_t threads = (size_t)gptoss_get_num_threads();
    size_t rows, n_tiles, last_rows, n_par;
    split_tiles(n, DEFAULT_F32_TILE_BYTES / (k * sizeof(float)), threads, &rows, &n_tiles, &last_rows, &n_par);

    int plan_threads = n_par > 1 ? 1 : (int)threads;
    matmul_key full_key = {.m = m, .n = rows, .k = k, .ldx = k, .ldy = rows, .has_bias = 0,
                           .y_dtype = GPTOSS_DTYPE_F32, .threads = plan_threads, .f32 = 1};
    matmul_key last_key = full_key;
    last_key.n = last_rows;
    last_key.ldy = last_rows;
    cache_entry *full = NULL, *last = NULL;
    int status = get_tile_primitives(&full_key, &last_key, n_par, &full, &last);
    for (size_t i = 0; i < n_par && !status; i++) {
        status = ensure_floats(&lanes[i].w_tile, &lanes[i].w_tile_elems, rows * k);
        if (!status) status = ensure_floats(&lanes[i].y_tile, &lanes[i].y_tile_elems, m * rows);
    }
    if (status) return status;

    int failed = GPTOSS_OK;
    #pragma omp parallel for num_threads((int)n_par) schedule(static) if (n_par > 1)
    for (size_t t = 0; t < n_tiles; t++) {
        size_t lane_id = (size_t)omp_get_thread_num();
        lane *l = &lanes[lane_id];
        size_t r0 = t * rows, r1 = t + 1 == n_tiles ? n : r0 + rows;
        widen_weight_rows(w, k, r0, r1, l->w_tile);
        int st = execute(t + 1 == n_tiles ? last : full, lane_id, x_f32, l->w_tile, NULL, l->y_tile);
        if (st) {
            #pragma omp atomic write
            failed = st;
        } else {
            store_tile(l->y_tile, m, r1 - r0, bias, r0, y, ldy, y_dtype);
        }
    }
    return failed;
}

static int f32_matmul(const gptoss_bf16 *x, size_t m, size_t k, size_t ldx, const weights_ref *w, size_t n,
                      const gptoss_bf16 *bias, void *y, size_t ldy, int y_dtype) {
    int gemv = m <= GEMV_MAX_ROWS;
    int status = ensure_engine();
    if (!status) status = widen_x(x, m, k, ldx, gemv && w->blocks && gptoss_gemv_mxfp4_deinterleaved());
    if (status) return status;
    return gemv ? f32_gemv(m, k, w, n, bias, y, ldy, y_dtype)
                              : f32_tiled(m, k, w, n, bias, y, ldy, y_dtype);
}

/* ---------------------------------------------------------------- public API */

/* One primitive for the whole product, on lane 0, all threads inside oneDNN. */
static int run_single(const matmul_key *key, const void *x, const void *w, const void *bias, void *y) {
    pthread_mutex_lock(&matmul_lock);
    cache_entry *e;
    int status = get_primitive(key, &e);
    if (!status) status = ensure_lanes(1, e->scratchpad_bytes);
    if (!status) status = ensure_entry_lanes(e, 1);
    if (!status) status = execute(e, 0, x, w, bias, y);
    pthread_mutex_unlock(&matmul_lock);
    return status;
}

GPTOSS_API int gptoss_matmul_bf16(const gptoss_bf16 *x, size_t m, size_t k, size_t ldx, const gptoss_bf16 *w,
                                  size_t n, const gptoss_bf16 *bias, void *y, size_t ldy, int y_dtype) {
    if (!x || !w || !y) return GPTOSS_ERR_NULL_POINTER;
    if (y_dtype != GPTOSS_DTYPE_BF16 && y_dtype != GPTOSS_DTYPE_F32) return GPTOSS_ERR_OUT_OF_RANGE;
    if (m == 0 || n == 0 || k == 0 || ldx < k || ldy < n) return GPTOSS_ERR_BAD_SIZE;
    size_t y_elem = y_dtype == GPTOSS_DTYPE_F32 ? sizeof(float) : sizeof(gptoss_bf16);
    if (!span_bytes(m, k, ldx, sizeof(gptoss_bf16)) || !span_bytes(n, k, k, sizeof(gptoss_bf16)) ||
        !span_bytes(m, n, ldy, y_elem))
        return GPTOSS_ERR_BAD_SIZE;

    int threads = gptoss_sync_threads();
    if (gptoss_get_isa() != GPTOSS_ISA_AVX512) {
        weights_ref wr = {.bf16 = w};
        pthread_mutex_lock(&matmul_lock);
        int status = f32_matmul(x, m, k, ldx, &wr, n, bias, y, ldy, y_dtype);
        pthread_mutex_unlock(&matmul_lock);
        return status;
    }
    matmul_key key = {.m = m, .n = n, .k = k, .ldx = ldx, .ldy = ldy, .has_bias = bias != NULL,
                      .y_dtype = y_dtype, .threads = threads};
    return run_single(&key, x, w, bias, y);
}

GPTOSS_API int gptoss_matmul_f32(const float *x, size_t m, size_t k, size_t ldx, const float *w, size_t n, float *y,
                                 size_t ldy) {
    if (!x || !w || !y) return GPTOSS_ERR_NULL_POINTER;
    if (m == 0 || n == 0 || k == 0 || ldx < k || ldy < n) return GPTOSS_ERR_BAD_SIZE;
    if (!span_bytes(m, k, ldx, sizeof(float)) || !span_bytes(n, k, k, sizeof(float)) ||
        !span_bytes(m, n, ldy, sizeof(float)))
        return GPTOSS_ERR_BAD_SIZE;
    matmul_key key = {.m = m, .n = n, .k = k, .ldx = ldx, .ldy = ldy, .has_bias = 0, .y_dtype = GPTOSS_DTYPE_F32,
                      .threads = gptoss_sync_threads(), .f32 = 1};
    return run_single(&key, x, w, NULL, y);
}

/*
 * q8, m > GEMV_MAX_ROWS on the AVX-512 BF16 path: W dequantized tile by tile to bf16 (q * scale rounded to
 * nearest even) into each lane's tile buffer, and each tile multiplied by oneDNN's bf16 matmul straight into
 * y's columns with the bias, tiles shared out between threads as gptoss_matmul_mxfp4's parallel tiles. Chosen
 * over exact fp32 tiles (f32_tiled, which this path ran first) because oneDNN's bf16 GEMM is about twice as
 * fast as its fp32 one: [5120, 2880], 2 threads, Zen 5 VM with load average ~6 from other jobs
 * (tools/bench_kernels.py --only q8, median-best GFLOP/s): fp32 tiles 62 at M=64 and 75-109 at M=512, bf16
 * tiles 99-118 and 161-182 (the bf16 matmul of bf16 weights: 127-130 and 201-208 in the first run).
 * The price: the weights are rounded to bf16 (8 significant bits; q * scale has
 * up to 19), a relative change of at most 2^-9 per weight, below the q8 rounding itself (up to 1/254 of the
 * block's largest value). Caller holds matmul_lock.
 */
static int q8_bf16_tiled(const gptoss_bf16 *x, size_t m, size_t k, size_t ldx, const int8_t *q,
                         const uint16_t *scales, size_t n, const gptoss_bf16 *bias, void *y, size_t ldy,
                         int y_dtype) {
    size_t threads = (size_t)gptoss_get_num_threads();
    size_t rows, n_tiles, last_rows, n_par;
    split_tiles(n, DEFAULT_TILE_BYTES / (k * sizeof(gptoss_bf16)), threads, &rows, &n_tiles, &last_rows, &n_par);
    size_t y_elem = y_dtype == GPTOSS_DTYPE_F32 ? sizeof(float) : sizeof(gptoss_bf16);

    int plan_threads = n_par > 1 ? 1 : (int)threads;
    matmul_key full_key = {.m = m, .n = rows, .k = k, .ldx = ldx, .ldy = ldy, .has_bias = bias != NULL,
                           .y_dtype = y_dtype, .threads = plan_threads};
    matmul_key last_key = full_key;
    last_key.n = last_rows;
    cache_entry *full = NULL, *last = NULL;
    int status = get_tile_primitives(&full_key, &last_key, n_par, &full, &last);
    /* The bf16 tile lives in the lane's fp32 tile buffer (half of it is enough). */
    for (size_t i = 0; i < n_par && !status; i++)
        status = ensure_floats(&lanes[i].w_tile, &lanes[i].w_tile_elems, (rows * k + 1) / 2);
    if (status) return status;

    int failed = GPTOSS_OK;
    #pragma omp parallel for num_threads((int)n_par) schedule(static) if (n_par > 1)
    for (size_t t = 0; t < n_tiles; t++) {
        size_t lane_id = (size_t)omp_get_thread_num();
        gptoss_bf16 *tile = (gptoss_bf16 *)lanes[lane_id].w_tile;
        size_t r0 = t * rows, r1 = t + 1 == n_tiles ? n : r0 + rows;
        gptoss_widen_q8_rows_bf16(q, scales, k, r0, r1, tile);
        int st = execute(t + 1 == n_tiles ? last : full, lane_id, x, tile, bias ? bias + r0 : NULL,
                         (char *)y + r0 * y_elem);
        if (st) {
            #pragma omp atomic write
            failed = st;
        }
    }
    return failed;
}

/*
 * q8 weights (q8.c) on every compute path: m <= GEMV_MAX_ROWS widens x to fp32 once and runs q8.c's register
 * kernel (each weight read once, rows split between threads as for bf16). Larger m: on the AVX-512 BF16 path
 * bf16 tiles into oneDNN's bf16 matmul (q8_bf16_tiled above, faster; weights rounded to bf16), on the fp32
 * paths exact fp32 tiles (q * scale) into oneDNN's fp32 GEMM, the fp32 path's f32_tiled.
 */
GPTOSS_API int gptoss_matmul_q8(const gptoss_bf16 *x, size_t m, size_t k, size_t ldx, const int8_t *q,
                                const uint16_t *scales, size_t n, const gptoss_bf16 *bias, void *y, size_t ldy,
                                int y_dtype) {
    if (!x || !q || !scales || !y) return GPTOSS_ERR_NULL_POINTER;
    if (y_dtype != GPTOSS_DTYPE_BF16 && y_dtype != GPTOSS_DTYPE_F32) return GPTOSS_ERR_OUT_OF_RANGE;
    if (m == 0 || n == 0 || k == 0 || k % 32 || ldx < k || ldy < n) return GPTOSS_ERR_BAD_SIZE;
    size_t y_elem = y_dtype == GPTOSS_DTYPE_F32 ? sizeof(float) : sizeof(gptoss_bf16);
    /* fp32 copies of x and of a tile of W must be addressable, as must y. */
    if (!span_bytes(m, k, ldx, sizeof(gptoss_bf16)) || !span_bytes(m, k, k, sizeof(float)) ||
        !span_bytes(n, k, k, sizeof(float)) || !span_bytes(m, n, ldy, y_elem))
        return GPTOSS_ERR_BAD_SIZE;
    gptoss_sync_threads();
    weights_ref wr = {.q8 = q, .q8_scales = scales};
    pthread_mutex_lock(&matmul_lock);
    int status = m > GEMV_MAX_ROWS && gptoss_get_isa() == GPTOSS_ISA_AVX512
                     ? q8_bf16_tiled(x, m, k, ldx, q, scales, n, bias, y, ldy, y_dtype)
                     : f32_matmul(x, m, k, ldx, &wr, n, bias, y, ldy, y_dtype);
    pthread_mutex_unlock(&matmul_lock);
    return status;
}

/*
 * Tiling. A tile is tile_rows rows of W (= tile_rows columns of y). For every tile: dequantize it into a
 * scratch slot, then one oneDNN matmul reads it back while it is still in cache and writes y[:, tile].
 *
 * Parallelism: when the scratch holds a slot per thread, the tiles are shared out by an `omp parallel for`
 * and each thread runs oneDNN single-threaded on its own tile (primitives planned for 1 thread, own lane).
 * Each core then dequantizes and multiplies its own tile in its own cache, with no barrier between the two
 * steps. The alternative (tiles in sequence, dequantize with all threads, then one oneDNN call with all
 * threads) pays two fork/joins per tile and moves half of each tile between cores: at M=1, 2 threads, it
 * measured 7.6 GB/s of MXFP4 against 10-11 for parallel tiles with 128-row tiles, 10.3 against 11.2 with
 * 384 (tools/bench_kernels.py --mxfp4-modes). When the scratch holds one slot only, that alternative is what
 * runs.
 */
GPTOSS_API int gptoss_matmul_mxfp4(const gptoss_bf16 *x, size_t m, size_t k, const uint8_t *blocks,
                                   const uint8_t *scales, size_t n, const gptoss_bf16 *bias, gptoss_bf16 *y,
                                   size_t ldy, gptoss_bf16 *scratch, size_t scratch_elems, size_t tile_rows) {
    if (!x || !blocks || !scales || !y || !scratch) return GPTOSS_ERR_NULL_POINTER;
    if (m == 0 || n == 0 || k == 0 || k % 32 || ldy < n) return GPTOSS_ERR_BAD_SIZE;
    /* The bf16 copy of all of W must be addressable (it bounds the MXFP4 sizes and every tile). */
    if (!span_bytes(m, k, k, sizeof(gptoss_bf16)) || !span_bytes(n, k, k, sizeof(gptoss_bf16)) ||
        !span_bytes(m, n, ldy, sizeof(gptoss_bf16)))
        return GPTOSS_ERR_BAD_SIZE;
    if (scratch_elems > (size_t)PTRDIFF_MAX / sizeof(gptoss_bf16)) return GPTOSS_ERR_BAD_SIZE;

    size_t threads = (size_t)gptoss_sync_threads();
    size_t rows = tile_rows;
    if (rows == 0) {
        /* About DEFAULT_TILE_BYTES, shrunk if need be so that every thread gets a slot of the scratch
         * (parallel tiles beat tiles in sequence even when smaller: 180-row tiles 10.4-10.8 GB/s of MXFP4,
         * against ~8.5 for 360-row tiles in sequence), and in a number of equal tiles that is a multiple of the
         * thread count, so the static split below is balanced ([2880, 2880]: 8 tiles of 360 rows rather
         * than 7 of 364 and one of 332, which would leave one thread a whole tile behind). */
        size_t target = DEFAULT_TILE_BYTES / (k * sizeof(gptoss_bf16));
        size_t fit = scratch_elems / k / threads;
        if (fit == 0) fit = scratch_elems / k; /* not one slot per thread: tiles in sequence */
        if (fit == 0) return GPTOSS_ERR_BAD_SIZE; /* scratch smaller than one row of W */
        if (target > fit) target = fit;
        if (target == 0) target = 1;
        size_t n_tiles = (n + target - 1) / target;
        n_tiles = (n_tiles + threads - 1) / threads * threads;
        rows = (n + n_tiles - 1) / n_tiles;
    }
    if (rows > n) rows = n;
    if (scratch_elems / k < rows) return GPTOSS_ERR_BAD_SIZE;
    size_t tile_elems = rows * k;
    size_t n_tiles = (n + rows - 1) / rows;
    size_t last_rows = n - (n_tiles - 1) * rows;
    size_t n_par = scratch_elems / tile_elems;
    if (n_par > threads) n_par = threads;
    if (n_par > n_tiles) n_par = n_tiles;
    size_t blocks_per_row = k / 32;

    if (gptoss_get_isa() != GPTOSS_ISA_AVX512) {
        /* The fp32 path validates the same arguments (above) but tiles in fp32 on its own buffers. */
        weights_ref wr = {.blocks = blocks, .scales = scales};
        pthread_mutex_lock(&matmul_lock);
        int status = f32_matmul(x, m, k, k, &wr, n, bias, y, ldy, GPTOSS_DTYPE_BF16);
        pthread_mutex_unlock(&matmul_lock);
        return status;
    }

    if (m <= GEMV_MAX_ROWS) {
        /* Few rows: decode each block in registers and VDPBF16PS it (gemv.c), W read once, no tile. */
        size_t per, parts = gemv_split(n, k, &per);
        #pragma omp parallel for num_threads((int)parts) schedule(static) if (parts > 1)
        for (size_t p = 0; p < parts; p++) {
            size_t r0 = p * per, r1 = r0 + per < n ? r0 + per : n;
            gptoss_gemv_mxfp4_rows_bf16(x, m, k, k, blocks, scales, bias, r0, r1, y, ldy);
        }
        return GPTOSS_OK;
    }

    /* Primitives for a full tile and for the last (possibly shorter) one. */
    int plan_threads = n_par > 1 ? 1 : (int)threads;
    matmul_key full_key = {.m = m, .n = rows, .k = k, .ldx = k, .ldy = ldy, .has_bias = bias != NULL,
                           .y_dtype = GPTOSS_DTYPE_BF16, .threads = plan_threads};
    matmul_key last_key = full_key;
    last_key.n = last_rows;

    pthread_mutex_lock(&matmul_lock);
    cache_entry *full = NULL, *last = NULL;
    int status = get_tile_primitives(&full_key, &last_key, n_par, &full, &last);
    if (status) {
        pthread_mutex_unlock(&matmul_lock);
        return status;
    }

    if (n_par > 1) {
        int failed = GPTOSS_OK;
        #pragma omp parallel for num_threads((int)n_par) schedule(static)
        for (size_t t = 0; t < n_tiles; t++) {
            size_t lane_id = (size_t)omp_get_thread_num();
            gptoss_bf16 *tile = scratch + lane_id * tile_elems;
            size_t r0 = t * rows, r1 = t + 1 == n_tiles ? n : r0 + rows;
            gptoss_dequantize_mxfp4_unchecked(blocks, scales, blocks_per_row, r0, r1, tile);
            int st = execute(t + 1 == n_tiles ? last : full, lane_id, x, tile, bias ? bias + r0 : NULL, y + r0);
            if (st) {
                #pragma omp atomic write
                failed = st;
            }
        }
        status = failed;
    } else {
        for (size_t t = 0; t < n_tiles && !status; t++) {
            size_t r0 = t * rows, r1 = t + 1 == n_tiles ? n : r0 + rows;
            status = gptoss_dequantize_mxfp4_rows(blocks, scales, n, blocks_per_row, r0, r1, scratch);
            if (!status)
                status = execute(t + 1 == n_tiles ? last : full, 0, x, scratch, bias ? bias + r0 : NULL, y + r0);
        }
    }
    pthread_mutex_unlock(&matmul_lock);
    return status;
}

GPTOSS_API size_t gptoss_matmul_cache_size(void) {
    pthread_mutex_lock(&matmul_lock);
    size_t count = 0;
    for (int i = 0; i < CACHE_CAPACITY; i++) count += cache[i].primitive != NULL;
    pthread_mutex_unlock(&matmul_lock);
    return count;
}

GPTOSS_API void gptoss_matmul_cache_clear(void) {
    pthread_mutex_lock(&matmul_lock);
    for (int i = 0; i < CACHE_CAPACITY; i++) destroy_entry(&cache[i]);
    for (size_t i = 0; i < n_lanes; i++) {
        if (lanes[i].stream) dnnl_stream_destroy(lanes[i].stream);
        free(lanes[i].scratchpad);
        free(lanes[i].w_tile);
        free(lanes[i].y_tile);
    }
    free(lanes);
    lanes = NULL;
    n_lanes = 0;
    free(x_f32);
    x_f32 = NULL;
    x_f32_elems = 0;
    pthread_mutex_unlock(&matmul_lock);
}
