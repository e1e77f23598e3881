/* Inner loops of k-reciprocal re-ranking (vehiclenet/retrieval/rerank.py), called through ctypes.
 *
 * Bit-identical to the numpy formulation in retrieval/rerank.py: the same float64 sums in the same
 * order, then the same float32 arithmetic. Built without fast-math and without FMA
 * contraction, so every operation rounds as numpy's does.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Jaccard distance rows [lo, hi) of the query rows of V against its gallery columns.
 *
 * vq: query rows of V in CSR (q_ptr, q_idx ascending per row, q_val).
 * vg: gallery rows of V in CSC over the same columns (g_ptr, g_idx = gallery row,
 *     ascending per column, g_val).
 * out: (num_query, num_gallery) float32, row-major.
 *
 * m[g] = sum over the query's columns c (ascending), over the gallery non-zeros of c
 * (ascending g), of min(V[q, c], V[g, c]), accumulated in float64; then
 * out[q, g] = 1 - m / (2 - m) in float32. Returns 0, or -1 when out of memory.
 */
int VnJaccardRows(const int64_t *q_ptr, const int32_t *q_idx, const float *q_val,
                  const int64_t *g_ptr, const int32_t *g_idx, const float *g_val,
                  int64_t num_gallery, int64_t lo, int64_t hi, float *out) {
    double *acc = (double *)malloc((size_t)(num_gallery > 0 ? num_gallery : 1) * sizeof(double));
    if (acc == NULL) return -1;
    for (int64_t q = lo; q < hi; ++q) {
        memset(acc, 0, (size_t)num_gallery * sizeof(double));
        for (int64_t a = q_ptr[q]; a < q_ptr[q + 1]; ++a) {
            const int32_t c = q_idx[a];
            const float vqc = q_val[a];
            for (int64_t b = g_ptr[c]; b < g_ptr[c + 1]; ++b) {
                const float vgc = g_val[b];
                acc[g_idx[b]] += (double)(vqc < vgc ? vqc : vgc);
            }
        }
        float *row = out + q * num_gallery;
        for (int64_t g = 0; g < num_gallery; ++g) {
            const float m = (float)acc[g];
            row[g] = 1.0f - m / (2.0f - m);
        }
    }
    free(acc);
    return 0;
}

/* Rows of re-ranking's normalised distance, in place: s (rows x n float32 products) becomes
 * d = t / max(t over the row) with t = (s * -2 + 2)^2, each step one float32 operation as
 * numpy's multiply, add, multiply and divide do it; row_max gets the maxima. One row at a
 * time, so a row of a large N stays in cache across the two passes. */
void VnNormalisedRows(float *s, int64_t rows, int64_t n, float *row_max) {
    for (int64_t r = 0; r < rows; ++r) {
        float *x = s + r * n;
        float m = -1.0f;  /* t >= 0 */
        for (int64_t j = 0; j < n; ++j) {
            float t = x[j] * -2.0f;
            t = t + 2.0f;
            t = t * t;
            x[j] = t;
            m = t > m ? t : m;
        }
        for (int64_t j = 0; j < n; ++j) x[j] = x[j] / m;
        row_max[r] = m;
    }
}

typedef struct {
    float value;
    int32_t index;
} Near;

/* (value, index) order: a before b. */
static int near_before(Near a, Near b) { return a.value < b.value || (a.value == b.value && a.index < b.index); }

static void sift_down(Near *heap, int64_t k, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, big = i;
        if (l < k && near_before(heap[big], heap[l])) big = l;
        if (r < k && near_before(heap[big], heap[r])) big = r;
        if (big == i) return;
        Near tmp = heap[i];
        heap[i] = heap[big];
        heap[big] = tmp;
        i = big;
    }
}

/* For each row of d (rows x n float32), the indices of its k smallest entries ordered by
 * (value, index): what a stable argsort's first k are. A max-heap of the k best so far; items
 * come by ascending index, so a later item displaces the worst kept one only if strictly
 * smaller. top is rows x k int32. Returns 0, or -1 when out of memory. */
int VnTopK(const float *d, int64_t rows, int64_t n, int64_t k, int32_t *top) {
    if (k <= 0) return 0;
    Near *heap = (Near *)malloc((size_t)k * sizeof(Near));
    if (heap == NULL) return -1;
    for (int64_t r = 0; r < rows; ++r) {
        const float *x = d + r * n;
        for (int64_t j = 0; j < k; ++j) {
            heap[j].value = x[j];
            heap[j].index = (int32_t)j;
        }
        for (int64_t i = k / 2 - 1; i >= 0; --i) sift_down(heap, k, i);
        for (int64_t j = k; j < n; ++j) {
            if (x[j] < heap[0].value) {
                heap[0].value = x[j];
                heap[0].index = (int32_t)j;
                sift_down(heap, k, 0);
            }
        }
        /* Heap sort: the largest goes to the end each time. */
        for (int64_t m = k - 1; m > 0; --m) {
            Near tmp = heap[0];
            heap[0] = heap[m];
            heap[m] = tmp;
            sift_down(heap, m, 0);
        }
        int32_t *out = top + r * k;
        for (int64_t j = 0; j < k; ++j) out[j] = heap[j].index;
    }
    free(heap);
    return 0;
}

/* ------------------------------------------------------------------------ evaluation */

typedef struct {
    double value;
    int64_t index;
} Hit;

static int hit_order(const void *a, const void *b) {
    const Hit *x = (const Hit *)a, *y = (const Hit *)b;
    if (x->value < y->value) return -1;
    if (x->value > y->value) return 1;
    return (x->index > y->index) - (x->index < y->index);
}

/* Number of hits (sorted by value, then index) that come before item (v, j), n >= 1.
 * Branch-free lower bound: an item's place among the hits is unpredictable, so a branching
 * search would mispredict at about every step. */
static int64_t hits_before(const Hit *hits, int64_t n, double v, int64_t j) {
    const Hit *base = hits;
    int64_t len = n;
    while (len > 1) {
        const int64_t half = len / 2;
        const Hit *h = &base[half - 1];
        const int before = (h->value < v) | ((h->value == v) & (h->index < j));
        base = before ? base + half : base;
        len -= half;
    }
    return (base - hits) + ((base->value < v) | ((base->value == v) & (base->index < j)));
}

/* For each row of x (rows x cols, row-major; lower = closer), the 0-based positions of its
 * good items among its non-junk items, ordered by (distance, column): written ascending to
 * out_pos, row after row (the caller sizes out_pos as the number of good items).
 * good and nonjunk are 0/1 bytes shaped like x; every good item is non-junk.
 * A good item's position counts the non-junk items before it: the good items before it (its
 * index among the sorted hits) plus the others, each placed in the gap between two hits by
 * binary search. Items after the last hit, most of a row, affect no position and are skipped.
 * Returns 0, or -1 when out of memory. */
#define HIT_POSITIONS(NAME, T)                                                                        \
    int NAME(const T *x, const uint8_t *good, const uint8_t *nonjunk, int64_t rows, int64_t cols,     \
             int64_t *out_pos) {                                                                      \
        Hit *hits = (Hit *)malloc((size_t)(cols > 0 ? cols : 1) * sizeof(Hit));                       \
        int64_t *gap = (int64_t *)malloc((size_t)(cols + 1) * sizeof(int64_t));                       \
        if (hits == NULL || gap == NULL) {                                                            \
            free(hits);                                                                               \
            free(gap);                                                                                \
            return -1;                                                                                \
        }                                                                                             \
        int64_t written = 0;                                                                          \
        for (int64_t r = 0; r < rows; ++r) {                                                          \
            const T *xr = x + r * cols;                                                               \
            const uint8_t *gr = good + r * cols, *nr = nonjunk + r * cols;                            \
            int64_t n = 0;                                                                            \
            for (int64_t j = 0; j < cols; ++j) {                                                      \
                if (gr[j]) {                                                                          \
                    hits[n].value = (double)xr[j];                                                    \
                    hits[n].index = j;                                                                \
                    ++n;                                                                              \
                }                                                                                     \
            }                                                                                         \
            if (n == 0) continue;                                                                     \
            qsort(hits, (size_t)n, sizeof(Hit), hit_order);                                           \
            memset(gap, 0, (size_t)(n + 1) * sizeof(int64_t));                                        \
            const double last = hits[n - 1].value, first = hits[0].value;                              \
            const int64_t last_index = hits[n - 1].index, first_index = hits[0].index;                 \
            for (int64_t j = 0; j < cols; ++j) {                                                      \
                if (!nr[j] || gr[j]) continue;                                                        \
                const double v = (double)xr[j];                                                       \
                if (v > last || (v == last && j > last_index)) continue;                              \
                if (v < first || (v == first && j < first_index))                                     \
                    gap[0] += 1;                                                                      \
                else                                                                                  \
                    gap[hits_before(hits, n, v, j)] += 1;                                             \
            }                                                                                         \
            /* Hit m follows hits 0..m-1 and the other items in gaps 0..m. */                         \
            int64_t others = 0;                                                                       \
            for (int64_t m = 0; m < n; ++m) {                                                         \
                others += gap[m];                                                                     \
                out_pos[written++] = m + others;                                                      \
            }                                                                                         \
        }                                                                                             \
        free(hits);                                                                                   \
        free(gap);                                                                                    \
        return 0;                                                                                     \
    }

HIT_POSITIONS(VnHitPositionsF32, float)
HIT_POSITIONS(VnHitPositionsF64, double)
