/* Inner loops of k-reciprocal re-ranking (vehiclenet/rerank.py), called through ctypes.
 *
 * Bit-identical to the numpy formulation in rerank.py: the same float64 sums in the same
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
