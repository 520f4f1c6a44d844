/*
 * Running k-smallest selection for torchfg's CPU k-NN search (torchfg/ops/knn/cpu.py), and the
 * exact recomputation of the selected distances (tfg_knn_cpu_exact, at the end).
 *
 * Plain C with no torch headers, so that the first build takes a second, loaded with ctypes and
 * operating on the data pointers of torch tensors. Each pool row keeps its k best (distance,
 * column) pairs so far (in a candidate buffer, see Pool), where distance = finish(raw key): the
 * raw keys of a tile are the GEMM output (see torchfg/ops/knn/reference.py) and finish is the
 * per-row non-decreasing map to distances (identity, + 1, clamp at 0, optionally after adding a
 * per-row value), computed here with the same fp32 operations as torch so that the selection is
 * the one of the torch path bit for bit, ties going to the lower column.
 *
 * Rejection is one compare on the raw key: a row's limit is the largest raw key that finishes at
 * or below the distance of its k-th best, so an entry above it cannot enter. Only entries that
 * pass are finished and compared exactly, on their (distance, column) key.
 *
 * Threads: OpenMP over pool rows (each row's buffer belongs to one thread). The library is linked
 * against libgomp.so.1 by soname, so inside a process that imported torch it shares torch's
 * OpenMP runtime (one thread pool) instead of loading a second one.
 *
 * Build (done by cpu.py, cached by source hash):
 *   cc -O3 -fPIC -shared -fopenmp -ffp-contract=off -fno-math-errno -std=c99 [-mavx2] knn_select.c -o lib.so
 * -ffp-contract=off keeps every operation an IEEE fp32 operation, as torch computes it.
 * (No -ffast-math: d + 0.0f below must turn -0.0 into +0.0.)
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#define TFG_VERSION 4

/* The finishes of the torch path that are plain IEEE operations (torch's fp32 sqrt is not: the
 * Euclidean selection runs on the squared distance, see cpu.py). */
enum { FINISH_IDENTITY = 0, FINISH_PLUS_ONE = 1, FINISH_CLAMP = 2 };

int tfg_knn_cpu_version(void) { return TFG_VERSION; }

int tfg_knn_cpu_simd(void) {
#if defined(__AVX2__)
    return 8;
#else
    return 1;
#endif
}

int tfg_knn_cpu_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The distance of a raw key: the same fp32 operations, in the same order, as the torch finishes
 * ((raw + 1.0).clamp_min(0); (raw + aux).clamp_min(0)). */
static inline float finish(float raw, float aux, int add_aux, int mode) {
    float v;
    switch (mode) {
        case FINISH_IDENTITY:
            return raw;
        case FINISH_PLUS_ONE:
            v = raw + 1.0f;
            return v < 0.0f ? 0.0f : v;
        default:
            v = add_aux ? raw + aux : raw;
            return v < 0.0f ? 0.0f : v;
    }
}

/* A (distance, column) pair as one unsigned 64-bit key with the same order: the distance's bits
 * mapped to an unsigned integer of the same order (negative floats reversed), then the column.
 * One integer compare per step of the selection. */
static inline uint64_t make_key(float d, int32_t c) {
    uint32_t u;
    d = d + 0.0f; /* -0.0 becomes +0.0: equal distances must tie, and then the column decides */
    memcpy(&u, &d, sizeof u);
    /* Every NaN after +inf, as torch's sort puts it: x86's default NaN (-inf + inf) has its sign
     * bit set, and the flip below ordered it before -inf, where it won the selection. */
    if (d != d)
        u = 0xffffffffu;
    else
        u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t)u << 32) | (uint32_t)c;
}

static inline float key_distance(uint64_t key) {
    uint32_t u = (uint32_t)(key >> 32);
    float d;
    u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
    memcpy(&d, &u, sizeof d);
    return d;
}

/* Floats as int64 in the same order (both zeros at 0), and back: the bisection below walks
 * adjacent floats. NaNs lie outside [-inf, +inf] in this order and are never produced. */
static inline int64_t ordered_float(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u & 0x80000000u) ? -(int64_t)(u & 0x7fffffffu) : (int64_t)u;
}

static inline float float_of_ordered(int64_t o) {
    const uint32_t u = o >= 0 ? (uint32_t)o : (0x80000000u | (uint32_t)(-o));
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* The largest raw key whose distance is at most d (a bisection over adjacent floats: the finish
 * is non-decreasing). Any raw key above it finishes above d. */
static float largest_raw_at_most(float d, float aux, int add_aux, int mode) {
    /* A NaN k-th distance (NaN sorts last) bounds nothing: every raw key may still enter. */
    if (d != d || (isinf(d) && d > 0)) return INFINITY;
    int64_t lo = ordered_float(-INFINITY), hi = ordered_float(INFINITY);
    /* finish(-inf) <= d for every finish (the clamped ones give 0 <= d); finish(+inf) > d. */
    while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (finish(float_of_ordered(mid), aux, add_aux, mode) <= d)
            lo = mid;
        else
            hi = mid;
    }
    return float_of_ordered(lo);
}

/*
 * Per pool row, a buffer of up to `capacity` candidate keys, of which the k smallest are the
 * row's k best so far. Candidates are appended (one store) while they beat the k-th best key of
 * the last reduction (`threshold`); a full buffer is reduced to its k best by a quickselect,
 * O(capacity), which tightens the threshold. Against a heap (log k dependent, mispredicted moves
 * per accepted entry), appending and selecting in batches cost a few ns per accepted entry.
 */
typedef struct {
    uint64_t *keys;      /* (R, capacity) */
    int32_t *count;      /* (R,) candidates held */
    uint64_t *threshold; /* (R,) k-th best key at the last reduction (UINT64_MAX before) */
    float *limit;        /* (R,) raw keys above it finish above the threshold's distance */
    int64_t k, capacity;
    const float *aux;    /* (R,) added to the raw key before the clamp, or NULL */
    int mode;
} Pool;

/* Reorder keys[0 .. n) so that keys[m] is the (m+1)-th smallest, with every key before it
 * smaller (keys are distinct: they end with the column). Branch-free partitions: the compares
 * of a selection are unpredictable. */
static void select_nth(uint64_t *keys, int64_t n, int64_t m) {
    int64_t lo = 0, hi = n - 1;
    while (hi - lo >= 16) {
        /* Median of three as the pivot, moved to hi. */
        const int64_t mid = lo + (hi - lo) / 2;
        uint64_t t;
        if (keys[mid] < keys[lo]) { t = keys[mid]; keys[mid] = keys[lo]; keys[lo] = t; }
        if (keys[hi] < keys[lo]) { t = keys[hi]; keys[hi] = keys[lo]; keys[lo] = t; }
        if (keys[mid] < keys[hi]) { t = keys[mid]; keys[mid] = keys[hi]; keys[hi] = t; }
        const uint64_t pivot = keys[hi];
        int64_t store = lo;
        for (int64_t i = lo; i < hi; i++) {
            const uint64_t v = keys[i];
            keys[i] = keys[store];
            keys[store] = v;
            store += v < pivot;
        }
        keys[hi] = keys[store];
        keys[store] = pivot;
        if (store == m) return;
        if (store < m)
            lo = store + 1;
        else
            hi = store - 1;
    }
    for (int64_t i = lo + 1; i <= hi; i++) { /* insertion sort of a short range */
        const uint64_t v = keys[i];
        int64_t j = i;
        for (; j > lo && keys[j - 1] > v; j--) keys[j] = keys[j - 1];
        keys[j] = v;
    }
}

/* Row r's buffer down to its k best; the threshold and limit become those of the k-th. */
static void reduce(const Pool *p, int64_t r) {
    uint64_t *keys = p->keys + r * p->capacity;
    const int64_t k = p->k;
    select_nth(keys, p->count[r], k - 1);
    p->count[r] = (int32_t)k;
    p->threshold[r] = keys[k - 1];
    p->limit[r] = largest_raw_at_most(key_distance(keys[k - 1]), p->aux ? p->aux[r] : 0.0f, p->aux != NULL, p->mode);
}

/* An entry that passed the raw-key filter: finished, and kept if it beats the threshold. */
static inline void consider(const Pool *p, int64_t r, float rw, int32_t c) {
    const float d = finish(rw, p->aux ? p->aux[r] : 0.0f, p->aux != NULL, p->mode);
    const uint64_t key = make_key(d, c);
    if (key >= p->threshold[r]) return;
    const int64_t at = p->count[r];
    p->keys[r * p->capacity + at] = key;
    p->count[r] = (int32_t)(at + 1);
    if (at + 1 == p->capacity) reduce(p, r);
}

/* Rows [r0, r1) of a block whose rows are contiguous: block[r * ld + j], j < width. */
static void scan_rows(const Pool *p, const float *block, int64_t ld, int64_t width, int64_t offset, int64_t r0,
                      int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const float *row = block + r * ld;
        int64_t j = 0;
#if defined(__AVX2__)
        for (; j + 32 <= width; j += 32) {
            const __m256 lim = _mm256_set1_ps(p->limit[r]);
            const __m256 m0 = _mm256_cmp_ps(_mm256_loadu_ps(row + j), lim, _CMP_LE_OQ);
            const __m256 m1 = _mm256_cmp_ps(_mm256_loadu_ps(row + j + 8), lim, _CMP_LE_OQ);
            const __m256 m2 = _mm256_cmp_ps(_mm256_loadu_ps(row + j + 16), lim, _CMP_LE_OQ);
            const __m256 m3 = _mm256_cmp_ps(_mm256_loadu_ps(row + j + 24), lim, _CMP_LE_OQ);
            /* The entries that pass the limit as it was at the load: it only tightens, so the
             * others stay rejected, and consider() checks these against the current state. */
            uint32_t mask = (uint32_t)_mm256_movemask_ps(m0) | ((uint32_t)_mm256_movemask_ps(m1) << 8) |
                            ((uint32_t)_mm256_movemask_ps(m2) << 16) | ((uint32_t)_mm256_movemask_ps(m3) << 24);
            while (mask) {
                const int t = __builtin_ctz(mask);
                mask &= mask - 1;
                if (row[j + t] <= p->limit[r]) consider(p, r, row[j + t], (int32_t)(offset + j + t));
            }
        }
#endif
        for (; j < width; j++)
            if (row[j] <= p->limit[r]) consider(p, r, row[j], (int32_t)(offset + j));
    }
}

/* Rows [r0, r1) of a transposed view: block[j * ld + r]. Reading it in place, one contiguous
 * stretch of pool rows per column, compares a vector of rows with a vector of their limits. */
static void scan_columns(const Pool *p, const float *block, int64_t ld, int64_t width, int64_t offset, int64_t r0,
                         int64_t r1) {
    for (int64_t j = 0; j < width; j++) {
        const float *line = block + j * ld;
        const int32_t c = (int32_t)(offset + j);
        int64_t r = r0;
#if defined(__AVX2__)
        for (; r + 16 <= r1; r += 16) {
            const __m256 m0 = _mm256_cmp_ps(_mm256_loadu_ps(line + r), _mm256_loadu_ps(p->limit + r), _CMP_LE_OQ);
            const __m256 m1 =
                _mm256_cmp_ps(_mm256_loadu_ps(line + r + 8), _mm256_loadu_ps(p->limit + r + 8), _CMP_LE_OQ);
            int mask = _mm256_movemask_ps(m0) | (_mm256_movemask_ps(m1) << 8);
            while (mask) {
                const int t = __builtin_ctz(mask);
                mask &= mask - 1;
                consider(p, r + t, line[r + t], c);
            }
        }
#endif
        for (; r < r1; r++)
            if (line[r] <= p->limit[r]) consider(p, r, line[r], c);
    }
}

/*
 * Offer a (rows, width) block of raw keys, columns offset .. offset + width - 1 (never offered
 * before), to the pool rows 0 .. rows - 1.
 *
 * Element (r, j) is at block[r * row_stride + j * col_stride]; col_stride == 1 (rows contiguous)
 * or row_stride == 1 (a transposed view of a contiguous matrix). Returns 0, or -1 for any other
 * layout (the caller then makes it contiguous).
 */
int tfg_knn_cpu_offer(const float *block, int64_t rows, int64_t width, int64_t row_stride, int64_t col_stride,
                      int64_t offset, uint64_t *keys, int32_t *count, uint64_t *threshold, float *limit, int64_t k,
                      int64_t capacity, const float *aux, int mode, int num_threads) {
    const Pool pool = {keys, count, threshold, limit, k, capacity, aux, mode};
    if (capacity <= k) return -2;
    const int transposed = col_stride != 1;
    if (transposed && row_stride != 1) return -1;
    if (rows <= 0 || width <= 0) return 0;
    /* Blocks of 32 rows per thread task: contiguous for the transposed scan, and whole cache
     * lines of the limits for each thread. */
    const int64_t step = 32;
    const int64_t tasks = (rows + step - 1) / step;
    int threads = num_threads < 1 ? 1 : num_threads;
    if (threads > tasks) threads = (int)tasks;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#ifdef _OPENMP
        const int64_t me = omp_get_thread_num(), team = omp_get_num_threads();
#else
        const int64_t me = 0, team = 1;
#endif
        /* One contiguous range of tasks per thread (static), so that a transposed scan reads one
         * stretch of each line. */
        const int64_t t0 = tasks * me / team, t1 = tasks * (me + 1) / team;
        const int64_t r0 = t0 * step, r1 = t1 * step < rows ? t1 * step : rows;
        if (r0 < r1) {
            if (transposed)
                scan_columns(&pool, block, col_stride, width, offset, r0, r1);
            else
                scan_rows(&pool, block, row_stride, width, offset, r0, r1);
        }
    }
    return 0;
}

/* Sort keys[0 .. n) in increasing order (quicksort, insertion sort below 16). */
static void sort_keys(uint64_t *keys, int64_t n) {
    while (n > 16) {
        const int64_t mid = n / 2;
        uint64_t t;
        if (keys[mid] < keys[0]) { t = keys[mid]; keys[mid] = keys[0]; keys[0] = t; }
        if (keys[n - 1] < keys[0]) { t = keys[n - 1]; keys[n - 1] = keys[0]; keys[0] = t; }
        if (keys[mid] < keys[n - 1]) { t = keys[mid]; keys[mid] = keys[n - 1]; keys[n - 1] = t; }
        const uint64_t pivot = keys[n - 1];
        int64_t store = 0;
        for (int64_t i = 0; i < n - 1; i++) {
            const uint64_t v = keys[i];
            keys[i] = keys[store];
            keys[store] = v;
            store += v < pivot;
        }
        keys[n - 1] = keys[store];
        keys[store] = pivot;
        /* Recurse into the smaller side, loop on the larger. */
        if (store < n - 1 - store) {
            sort_keys(keys, store);
            keys += store + 1;
            n -= store + 1;
        } else {
            sort_keys(keys + store + 1, n - store - 1);
            n = store;
        }
    }
    for (int64_t i = 1; i < n; i++) {
        const uint64_t v = keys[i];
        int64_t j = i;
        for (; j > 0 && keys[j - 1] > v; j--) keys[j] = keys[j - 1];
        keys[j] = v;
    }
}

/*
 * Write each pool row's k best sorted by (distance, column): out_dist (rows, k) fp32 and out_col
 * (rows, k) int64. Rows offered fewer than k columns end with (inf, 2^31 - 1). The buffers are
 * consumed.
 */
void tfg_knn_cpu_result(uint64_t *keys, int32_t *count, uint64_t *threshold, float *limit, int64_t rows, int64_t k,
                        int64_t capacity, float *out_dist, int64_t *out_col, int num_threads) {
    /* No aux: the limits are not needed any more. */
    const Pool pool = {keys, count, threshold, limit, k, capacity, NULL, 0};
    int threads = num_threads < 1 ? 1 : num_threads;
    if (rows * capacity < 8192) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) {
        if (count[r] > k) reduce(&pool, r);
        uint64_t *row = keys + r * capacity;
        const int64_t held = count[r];
        sort_keys(row, held);
        for (int64_t i = 0; i < k; i++) {
            out_dist[r * k + i] = i < held ? key_distance(row[i]) : INFINITY;
            out_col[r * k + i] = i < held ? (int64_t)(uint32_t)row[i] : 2147483647;
        }
    }
}

/*
 * The exact recomputation of the selected pairs (torchfg.ops.knn._exact_selected on CPU tensors).
 *
 * The search selects on the GEMM form |q|^2 + |g|^2 - 2 q.g; the returned distances are then
 * recomputed from the rows themselves. The PyTorch path gathers the k selected gallery rows of
 * each query into a (rows, k, D) block and takes the difference, square and sum as separate
 * passes: at k = 100, D = 512 that writes and reads 800 MB per 4096 queries, as long as the
 * search itself. Here each pair is one pass over its two rows, read where they lie.
 *
 * Each sum runs in 32 lanes (element i goes to lane i % 32; AVX2: four 8-wide accumulators), and
 * the lanes are combined pairwise in a fixed order, so the AVX2 and the scalar builds return the
 * same bits and the result does not depend on the thread count.
 */
enum { EXACT_SQEUCLIDEAN = 0, EXACT_EUCLIDEAN = 1, EXACT_COSINE = 2, EXACT_DOT = 3 };

/* sum_i (a[i] - b[i])^2, or sum_i a[i] b[i] (squared_difference == 0), in the 32 fixed lanes. */
static inline float lane_sum(const float *a, const float *b, int64_t width, int squared_difference) {
    float lanes[32];
    int64_t i = 0;
#if defined(__AVX2__)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    if (squared_difference) {
        for (; i + 32 <= width; i += 32) {
            const __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
            const __m256 t1 = _mm256_sub_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8));
            const __m256 t2 = _mm256_sub_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16));
            const __m256 t3 = _mm256_sub_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24));
            s0 = _mm256_add_ps(s0, _mm256_mul_ps(t0, t0));
            s1 = _mm256_add_ps(s1, _mm256_mul_ps(t1, t1));
            s2 = _mm256_add_ps(s2, _mm256_mul_ps(t2, t2));
            s3 = _mm256_add_ps(s3, _mm256_mul_ps(t3, t3));
        }
    } else {
        for (; i + 32 <= width; i += 32) {
            s0 = _mm256_add_ps(s0, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
            s1 = _mm256_add_ps(s1, _mm256_mul_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8)));
            s2 = _mm256_add_ps(s2, _mm256_mul_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16)));
            s3 = _mm256_add_ps(s3, _mm256_mul_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24)));
        }
    }
    _mm256_storeu_ps(lanes, s0);
    _mm256_storeu_ps(lanes + 8, s1);
    _mm256_storeu_ps(lanes + 16, s2);
    _mm256_storeu_ps(lanes + 24, s3);
#else
    for (int l = 0; l < 32; l++) lanes[l] = 0.0f;
    for (; i + 32 <= width; i += 32)
        for (int l = 0; l < 32; l++) {
            const float t = squared_difference ? a[i + l] - b[i + l] : a[i + l];
            lanes[l] += t * (squared_difference ? t : b[i + l]);
        }
#endif
    /* The tail continues the lanes: i is a multiple of 32 here. */
    for (int l = 0; i < width; i++, l++) {
        const float t = squared_difference ? a[i] - b[i] : a[i];
        lanes[l] += t * (squared_difference ? t : b[i]);
    }
    for (int half = 16; half >= 1; half /= 2)
        for (int l = 0; l < half; l++) lanes[l] += lanes[l + half];
    return lanes[0];
}

/*
 * For each of `rows` query rows r and its k selected gallery rows c = columns[r * k + j]:
 *   EXACT_SQEUCLIDEAN  |q - g|^2            EXACT_EUCLIDEAN  sqrt(|q - g|^2) (IEEE sqrt)
 *   EXACT_COSINE       |q - g|^2 / 2 for unit rows, 1 where either row is zero (nonzero flags)
 *   EXACT_DOT          -q.g
 * then each row's k pairs sorted by (distance, column) into out_dist (rows, k) fp32 and out_col
 * (rows, k) int64 (which may be `columns` itself). Row r of the queries is query[r * query_stride
 * + i], gallery row c is gallery[c * gallery_stride + i], i < width. Columns must lie in
 * [0, 2^31 - 1). query_nonzero / gallery_nonzero (uint8) are read for EXACT_COSINE only.
 */
void tfg_knn_cpu_exact(const float *query, int64_t query_stride, const float *gallery, int64_t gallery_stride,
                       int64_t width, int64_t rows, int64_t k, const int64_t *columns, const uint8_t *query_nonzero,
                       const uint8_t *gallery_nonzero, int metric, float *out_dist, int64_t *out_col,
                       int num_threads) {
    int threads = num_threads < 1 ? 1 : num_threads;
    if (rows * k * (width + 16) < 65536) threads = 1;
    const int squared_difference = metric != EXACT_DOT;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *q = query + r * query_stride;
        /* The row's keys are built in its own slots of out_col (a column is read before its slot
         * is written), then sorted there. */
        const int64_t *selected = columns + r * k;
        uint64_t *keys = (uint64_t *)(out_col + r * k);
        for (int64_t j = 0; j < k; j++) {
            const int64_t c = selected[j];
            /* The next pair's gallery row, whole: the rows are scattered, so the hardware
             * prefetcher cannot see them coming (10% at Q = G = 32768, k = 100, D = 512). */
            if (j + 1 < k)
                for (int64_t i = 0; i < width; i += 16)
                    __builtin_prefetch(gallery + selected[j + 1] * gallery_stride + i);
            float d = lane_sum(q, gallery + c * gallery_stride, width, squared_difference);
            if (metric == EXACT_EUCLIDEAN)
                d = sqrtf(d);
            else if (metric == EXACT_COSINE)
                d = query_nonzero[r] && gallery_nonzero[c] ? d * 0.5f : 1.0f;
            else if (metric == EXACT_DOT)
                d = -d;
            keys[j] = make_key(d, (int32_t)c);
        }
        sort_keys(keys, k);
        for (int64_t j = 0; j < k; j++) {
            const uint64_t key = keys[j];
            float d = key_distance(key);
            /* The key holds +0.0 for both zeros; -q.g is -0.0 exactly when the sum is +0.0 (a
             * sum from +0.0 accumulators is never -0.0), as torch's neg of its sum gives. */
            if (metric == EXACT_DOT && d == 0.0f) d = -0.0f;
            out_dist[r * k + j] = d;
            out_col[r * k + j] = (int64_t)(uint32_t)key;
        }
    }
}
