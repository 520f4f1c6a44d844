// C interface of the exact k-NN CUDA kernel (torchfg/csrc/knn/knn_kernel.cu).
//
// Kept free of torch headers so that the kernel compiles standalone with nvcc (the compile-only
// CI check); knn_binding.cpp wraps it as the torch op torchfg_cuda::knn.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of query and gallery.
enum TorchfgKnnDtype { TORCHFG_KNN_FLOAT32 = 0, TORCHFG_KNN_FLOAT16 = 1, TORCHFG_KNN_BFLOAT16 = 2 };

// Metric codes, same as torchfg.ops.knn: distances are
//   0 sqeuclidean: max(|q|^2 + |g|^2 - 2 q.g, 0)   (aux = squared norms)
//   1 euclidean:   sqrt of the above                (aux = squared norms)
//   2 cosine:      1 - q.g * inv|q| * inv|g|        (aux = inverse norms, 0 for zero rows)
//   3 dot:         -q.g                             (aux unused, may be null)
enum TorchfgKnnMetric { TORCHFG_KNN_SQEUCLIDEAN = 0, TORCHFG_KNN_EUCLIDEAN = 1, TORCHFG_KNN_COSINE = 2, TORCHFG_KNN_DOT = 3 };

// Largest k the kernel accepts (the running lists live in shared memory).
#define TORCHFG_KNN_MAX_K 1024

// One launch configuration of the kernel (an entry of the per-k table in knn_kernel.cu).
typedef struct TorchfgKnnConfig {
    int index;        // position in the table (-1: no configuration fits)
    int block_q;      // query rows per block
    int block_g;      // gallery rows per tile
    int block_d;      // embedding columns per pipeline stage (16-bit: 32, fp32: 16)
    int stages;       // cp.async pipeline depth
    int candidates;   // per-query candidate buffer between merges
    int smem_bytes;   // dynamic shared memory of a launch with this k
} TorchfgKnnConfig;

// Finds, for each of the num_query rows of `query` (row-major, row stride query_stride elements,
// unit column stride), the k gallery rows at the smallest distance, ties broken by the lower
// gallery index. The gallery is cut into `splits` contiguous ranges of `split_size` rows (the
// last may be shorter); split s writes its k best, sorted by (distance, index), to
// out_distances[s][num_query][k] (fp32) and out_indices[s][num_query][k] (int64). Slots a split
// cannot fill hold (+inf, -1). The caller merges the splits.
//
// symmetric != 0: gallery is query, and d(i, i) is set to its exact value (0; 1 for a zero row
// under cosine; unchanged for dot). self_offset >= 0: query row i skips gallery row
// self_offset + i.
//
// Returns cudaSuccess, cudaErrorInvalidValue for bad arguments, or the launch error.
// `max_dynamic_smem` is the device's opt-in shared memory per block
// (cudaDevAttrMaxSharedMemoryPerBlockOptin); a k too large for it returns
// cudaErrorInvalidConfiguration.
int torchfg_knn_launch(
    const void* query, const void* gallery, const float* query_aux, const float* gallery_aux,
    int dtype, int64_t num_query, int64_t num_gallery, int64_t dim,
    int64_t query_stride, int64_t gallery_stride,
    int k, int metric, int symmetric, int64_t self_offset,
    int64_t split_size, int splits,
    float* out_distances, int64_t* out_indices,
    int max_dynamic_smem, cudaStream_t stream);

// The configuration a launch with this dtype and k uses on a device offering max_dynamic_smem
// bytes per block (the k's preferred table entry, else the first smaller one that fits); index
// -1 when none fits or the arguments are out of range.
TorchfgKnnConfig torchfg_knn_config(int dtype, int k, int max_dynamic_smem);

// Smallest dynamic shared memory (bytes) any configuration needs for this k, or -1 for a k out of
// range. Non-decreasing in k: the largest k a device supports is found by bisection on it.
int torchfg_knn_smem_bytes(int dtype, int k);

#ifdef __cplusplus
}
#endif
