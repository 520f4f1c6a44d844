// Exact k-nearest-neighbour search: tiled distances (tensor cores for fp16/bf16) with a per-query
// top-k list in shared memory, merged across gallery tiles.
//
// One block owns `block_q` (32 or 16) queries and one contiguous gallery range (a split). For
// every 64-row gallery tile it
//   1. computes the block_q x 64 tile of inner products: WMMA 16x16x16 fragments with fp32
//      accumulators for fp16/bf16 (one fragment per warp), plain fp32 FMAs otherwise, over
//      32-column slices of D staged in shared memory (zero-padded, so any D and any alignment
//      works);
//   2. finishes the metric per pair and lets every pair below the query's current k-th distance
//      into a per-query candidate buffer (warp ballot, no atomics);
//   3. when a buffer could overflow on the next tile, one warp merges it into the query's sorted
//      list: bitonic sort of the buffer, then every element's final rank by binary search in
//      the other sorted sequence, so the merge needs no second copy of the list.
// Pairs are ordered by (distance, gallery index). Gallery tiles are visited in increasing index
// order, so a new pair can only beat an equal listed distance if it is strictly smaller: the
// strict "<" filter keeps ties on the lower index, and the merge sorts on the pair.
//
// No torch headers: this file compiles standalone with nvcc (see csrc/check_compile.sh).

#include "knn_kernel.h"

#include <cfloat>
#include <climits>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockG = 64;             // gallery rows per tile
constexpr int kBlockD = 32;             // embedding columns per staged slice
constexpr int kPitchHalf = kBlockD + 8; // smem row pitch (elements) of 16-bit operands: WMMA ldm % 8 == 0
constexpr int kPitchFloat = kBlockD + 1;  // smem row pitch of fp32 operands: conflict-free column reads
constexpr int kPitchTile = kBlockG + 4; // smem row pitch of the fp32 product tile: WMMA ldm % 4 == 0
constexpr int kCand = 128;              // candidate buffer per query; power of two for the bitonic sort
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kCand >= 2 * kBlockG, "a merge must leave room for a whole tile");
static_assert(kBlockG % 32 == 0 && kBlockD % 16 == 0, "tile sizes");

struct Params {
    const void* query;
    const void* gallery;
    const float* query_aux;
    const float* gallery_aux;
    int64_t num_query, num_gallery, dim, query_stride, gallery_stride;
    int64_t self_offset, split_size;
    int k, metric, symmetric, block_q;
    float* out_distances;
    int64_t* out_indices;
};

__host__ __device__ constexpr size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Byte offsets of the shared-memory regions for a block of `block_q` queries.
struct Layout {
    size_t a, b, tile, list_d, list_i, cand_d, cand_i, list_len, cand_count, thresh, total;
    __host__ __device__ Layout(int block_q, int k) {
        // Operand tiles sized for the larger of the fp32 and the 16-bit layouts.
        size_t a_bytes = (size_t)block_q * kPitchFloat * sizeof(float);
        size_t b_bytes = (size_t)kBlockG * kPitchFloat * sizeof(float);
        a = 0;
        b = align_up(a + a_bytes, 128);
        tile = align_up(b + b_bytes, 128);
        list_d = align_up(tile + (size_t)block_q * kPitchTile * sizeof(float), 128);
        list_i = align_up(list_d + (size_t)block_q * k * sizeof(float), 16);
        cand_d = align_up(list_i + (size_t)block_q * k * sizeof(int), 16);
        cand_i = align_up(cand_d + (size_t)block_q * kCand * sizeof(float), 16);
        list_len = align_up(cand_i + (size_t)block_q * kCand * sizeof(int), 16);
        cand_count = align_up(list_len + (size_t)block_q * sizeof(int), 16);
        thresh = align_up(cand_count + (size_t)block_q * sizeof(int), 16);
        total = align_up(thresh + (size_t)block_q * sizeof(float), 16);
    }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
    if constexpr (std::is_same<T, __half>::value) return __half2float(v);
    else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat162float(v);
    else return v;
}

template <typename T>
__device__ __forceinline__ T zero_value() {
    if constexpr (std::is_same<T, __half>::value) return __float2half(0.0f);
    else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16(0.0f);
    else return T(0);
}

// Whether this device pass runs T through WMMA (bf16 fragments need sm_80, fp16 sm_70).
template <typename T>
__device__ constexpr bool use_tensor_cores() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    return std::is_same<T, __half>::value;
#else
    return false;
#endif
}

__device__ __forceinline__ bool lex_less(float a_d, int a_i, float b_d, int b_i) {
    return a_d < b_d || (a_d == b_d && a_i < b_i);
}

// Number of the first n entries of the sorted (d, i) sequence that are lexicographically below (d, i).
__device__ __forceinline__ int count_less(const float* seq_d, const int* seq_i, int n, float d, int i) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (lex_less(seq_d[mid], seq_i[mid], d, i)) lo = mid + 1; else hi = mid;
    }
    return lo;
}

__device__ __forceinline__ float finish_distance(float dot, float q_aux, float g_aux, int metric) {
    switch (metric) {
        case TORCHFG_KNN_SQEUCLIDEAN: return fmaxf(q_aux + g_aux - 2.0f * dot, 0.0f);
        case TORCHFG_KNN_EUCLIDEAN: return sqrtf(fmaxf(q_aux + g_aux - 2.0f * dot, 0.0f));
        case TORCHFG_KNN_COSINE: return 1.0f - dot * q_aux * g_aux;
        default: return -dot;
    }
}

// Stages rows [row0, row0 + rows) x columns [d0, d0 + kBlockD) of a row-major matrix into shared
// memory, zero-filling outside [0, row_end) x [0, dim).
template <typename T, typename S>
__device__ __forceinline__ void stage_rows(S* dst, int pitch, const T* src, int64_t stride, int64_t row0, int rows,
                                           int64_t row_end, int64_t d0, int64_t dim) {
    for (int idx = threadIdx.x; idx < rows * kBlockD; idx += kThreads) {
        int r = idx / kBlockD, c = idx % kBlockD;
        int64_t row = row0 + r, col = d0 + c;
        S v;
        if (row < row_end && col < dim) {
            if constexpr (std::is_same<S, float>::value) v = to_float<T>(src[row * stride + col]);
            else v = src[row * stride + col];
        } else {
            if constexpr (std::is_same<S, float>::value) v = 0.0f;
            else v = zero_value<S>();
        }
        dst[r * pitch + c] = v;
    }
}

// Inner products of the block's queries with gallery rows [g0, g0 + kBlockG) into `tile`.
template <typename T>
__device__ void product_tile(const Params& p, unsigned char* smem, const Layout& lay, int64_t q0, int64_t g0,
                             int64_t g_end, float* tile) {
    const T* query = static_cast<const T*>(p.query);
    const T* gallery = static_cast<const T*>(p.gallery);
    const int block_q = p.block_q;
    const int64_t q_end = p.num_query;
    if constexpr (use_tensor_cores<T>()) {
        using namespace nvcuda;
        T* sa = reinterpret_cast<T*>(smem + lay.a);
        T* sb = reinterpret_cast<T*>(smem + lay.b);
        const int warp = threadIdx.x / 32;
        const int fragments = (block_q / 16) * (kBlockG / 16);
        const bool has_fragment = warp < fragments;
        const int fm = warp / (kBlockG / 16), fn = warp % (kBlockG / 16);
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int64_t d0 = 0; d0 < p.dim; d0 += kBlockD) {
            stage_rows<T, T>(sa, kPitchHalf, query, p.query_stride, q0, block_q, q_end, d0, p.dim);
            stage_rows<T, T>(sb, kPitchHalf, gallery, p.gallery_stride, g0, kBlockG, g_end, d0, p.dim);
            __syncthreads();
            if (has_fragment) {
#pragma unroll
                for (int kk = 0; kk < kBlockD; kk += 16) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                    // Gallery rows as the columns of B: B(k, n) = sb[n * pitch + k], i.e. col-major.
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
                    wmma::load_matrix_sync(a, sa + fm * 16 * kPitchHalf + kk, kPitchHalf);
                    wmma::load_matrix_sync(b, sb + fn * 16 * kPitchHalf + kk, kPitchHalf);
                    wmma::mma_sync(acc, a, b, acc);
                }
            }
            __syncthreads();
        }
        if (has_fragment) {
            wmma::store_matrix_sync(tile + fm * 16 * kPitchTile + fn * 16, acc, kPitchTile, wmma::mem_row_major);
        }
    } else {
        float* sa = reinterpret_cast<float*>(smem + lay.a);
        float* sb = reinterpret_cast<float*>(smem + lay.b);
        // Thread -> one gallery column and every (kThreads / kBlockG)-th query row.
        constexpr int kRowGroups = kThreads / kBlockG;
        const int col = threadIdx.x % kBlockG, row_group = threadIdx.x / kBlockG;
        const int rows_per_thread = block_q / kRowGroups;  // <= 8
        float acc[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) acc[t] = 0.0f;
        for (int64_t d0 = 0; d0 < p.dim; d0 += kBlockD) {
            stage_rows<T, float>(sa, kPitchFloat, query, p.query_stride, q0, block_q, q_end, d0, p.dim);
            stage_rows<T, float>(sb, kPitchFloat, gallery, p.gallery_stride, g0, kBlockG, g_end, d0, p.dim);
            __syncthreads();
#pragma unroll 4
            for (int kk = 0; kk < kBlockD; ++kk) {
                const float b = sb[col * kPitchFloat + kk];
#pragma unroll
                for (int t = 0; t < 8; ++t) {
                    if (t < rows_per_thread) acc[t] = fmaf(sa[(row_group + kRowGroups * t) * kPitchFloat + kk], b, acc[t]);
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            if (t < rows_per_thread) tile[(row_group + kRowGroups * t) * kPitchTile + col] = acc[t];
        }
    }
}

// Merges query `qi`'s candidate buffer into its sorted list. Called by one whole warp.
__device__ void merge_candidates(const Params& p, unsigned char* smem, const Layout& lay, int qi) {
    const int lane = threadIdx.x % 32;
    const int k = p.k;
    float* list_d = reinterpret_cast<float*>(smem + lay.list_d) + (size_t)qi * k;
    int* list_i = reinterpret_cast<int*>(smem + lay.list_i) + (size_t)qi * k;
    float* cand_d = reinterpret_cast<float*>(smem + lay.cand_d) + (size_t)qi * kCand;
    int* cand_i = reinterpret_cast<int*>(smem + lay.cand_i) + (size_t)qi * kCand;
    int* list_len = reinterpret_cast<int*>(smem + lay.list_len);
    int* cand_count = reinterpret_cast<int*>(smem + lay.cand_count);
    float* thresh = reinterpret_cast<float*>(smem + lay.thresh);

    const int n = cand_count[qi];
    const int len = list_len[qi];
    __syncwarp();
    for (int t = lane; t < kCand; t += 32) {
        if (t >= n) { cand_d[t] = FLT_MAX; cand_i[t] = INT_MAX; }
    }
    __syncwarp();
    // Bitonic sort of the buffer on (distance, index).
    for (int size = 2; size <= kCand; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = lane; t < kCand / 2; t += 32) {
                const int i = 2 * stride * (t / stride) + (t % stride);
                const int j = i + stride;
                const bool ascending = (i & size) == 0;
                const float di = cand_d[i], dj = cand_d[j];
                const int ii = cand_i[i], ij = cand_i[j];
                if (lex_less(dj, ij, di, ii) == ascending) {
                    cand_d[i] = dj; cand_i[i] = ij;
                    cand_d[j] = di; cand_i[j] = ii;
                }
            }
            __syncwarp();
        }
    }
    // Final rank of every candidate among list + buffer (keys are unique: distinct indices),
    // taken before the list moves.
    int cand_rank[kCand / 32];
#pragma unroll
    for (int u = 0; u < kCand / 32; ++u) {
        const int r = lane + 32 * u;
        cand_rank[u] = r < n ? r + count_less(list_d, list_i, len, cand_d[r], cand_i[r]) : INT_MAX;
    }
    __syncwarp();
    // List entries only move to higher positions: moving them in rounds of 32 from the back, an
    // entry is always read before anything is written over it.
    if (len > 0) {
        for (int base = ((len - 1) / 32) * 32; base >= 0; base -= 32) {
            const int pos = base + lane;
            float d = 0.0f;
            int idx = 0, rank = INT_MAX;
            if (pos < len) {
                d = list_d[pos];
                idx = list_i[pos];
                rank = pos + count_less(cand_d, cand_i, n, d, idx);
            }
            __syncwarp();
            if (rank < k) { list_d[rank] = d; list_i[rank] = idx; }
            __syncwarp();
        }
    }
#pragma unroll
    for (int u = 0; u < kCand / 32; ++u) {
        if (cand_rank[u] < k) {
            const int r = lane + 32 * u;
            list_d[cand_rank[u]] = cand_d[r];
            list_i[cand_rank[u]] = cand_i[r];
        }
    }
    __syncwarp();
    if (lane == 0) {
        const int new_len = min(k, len + n);
        list_len[qi] = new_len;
        cand_count[qi] = 0;
        thresh[qi] = new_len == k ? list_d[k - 1] : INFINITY;
    }
    __syncwarp();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) knn_kernel(Params p) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int block_q = p.block_q;
    const Layout lay(block_q, p.k);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t q0 = (int64_t)blockIdx.x * block_q;
    const int64_t g_begin = (int64_t)blockIdx.y * p.split_size;
    const int64_t g_end = min(g_begin + p.split_size, p.num_gallery);

    float* tile = reinterpret_cast<float*>(smem + lay.tile);
    float* cand_d = reinterpret_cast<float*>(smem + lay.cand_d);
    int* cand_i = reinterpret_cast<int*>(smem + lay.cand_i);
    int* list_len = reinterpret_cast<int*>(smem + lay.list_len);
    int* cand_count = reinterpret_cast<int*>(smem + lay.cand_count);
    float* thresh = reinterpret_cast<float*>(smem + lay.thresh);
    for (int i = threadIdx.x; i < block_q; i += kThreads) {
        list_len[i] = 0;
        cand_count[i] = 0;
        thresh[i] = INFINITY;
    }
    __syncthreads();

    for (int64_t g0 = g_begin; g0 < g_end; g0 += kBlockG) {
        product_tile<T>(p, smem, lay, q0, g0, g_end, tile);
        __syncthreads();
        for (int qi = warp; qi < block_q; qi += kWarps) {
            const int64_t qg = q0 + qi;
            if (qg >= p.num_query) break;  // warp-uniform
            const float q_aux = p.metric == TORCHFG_KNN_DOT ? 0.0f : p.query_aux[qg];
            const float limit = thresh[qi];
            int count = cand_count[qi];
            float* my_cand_d = cand_d + (size_t)qi * kCand;
            int* my_cand_i = cand_i + (size_t)qi * kCand;
            for (int c = lane; c < kBlockG; c += 32) {
                const int64_t j = g0 + c;
                bool valid = j < g_end && !(p.self_offset >= 0 && j == qg + p.self_offset);
                float d = INFINITY;
                if (valid) {
                    const float g_aux = p.metric == TORCHFG_KNN_DOT ? 0.0f : p.gallery_aux[j];
                    d = finish_distance(tile[qi * kPitchTile + c], q_aux, g_aux, p.metric);
                    if (p.symmetric && j == qg) {
                        if (p.metric == TORCHFG_KNN_COSINE) d = q_aux > 0.0f ? 0.0f : d;
                        else if (p.metric != TORCHFG_KNN_DOT) d = 0.0f;
                    }
                }
                const bool keep = valid && d < limit;
                const unsigned ballot = __ballot_sync(kFullMask, keep);
                if (keep) {
                    const int pos = count + __popc(ballot & ((1u << lane) - 1u));
                    my_cand_d[pos] = d;
                    my_cand_i[pos] = (int)j;
                }
                count += __popc(ballot);
            }
            __syncwarp();
            if (lane == 0) cand_count[qi] = count;
            __syncwarp();
            if (count > kCand - kBlockG) merge_candidates(p, smem, lay, qi);
        }
        __syncthreads();
    }

    float* list_d = reinterpret_cast<float*>(smem + lay.list_d);
    int* list_i = reinterpret_cast<int*>(smem + lay.list_i);
    for (int qi = warp; qi < block_q; qi += kWarps) {
        const int64_t qg = q0 + qi;
        if (qg >= p.num_query) break;
        if (cand_count[qi] > 0) merge_candidates(p, smem, lay, qi);
        const int len = list_len[qi];
        const size_t out = ((size_t)blockIdx.y * p.num_query + qg) * p.k;
        for (int t = lane; t < p.k; t += 32) {
            const bool have = t < len;
            p.out_distances[out + t] = have ? list_d[(size_t)qi * p.k + t] : INFINITY;
            p.out_indices[out + t] = have ? (int64_t)list_i[(size_t)qi * p.k + t] : (int64_t)-1;
        }
    }
}

template <typename T>
cudaError_t launch_typed(const Params& p, int splits, size_t smem_bytes, cudaStream_t stream) {
    cudaError_t err = cudaFuncSetAttribute(knn_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes);
    if (err != cudaSuccess) return err;
    const dim3 grid((unsigned)((p.num_query + p.block_q - 1) / p.block_q), (unsigned)splits);
    knn_kernel<T><<<grid, kThreads, smem_bytes, stream>>>(p);
    return cudaGetLastError();
}

}  // namespace

extern "C" int torchfg_knn_smem_bytes(int dtype, int k, int block_q) {
    (void)dtype;  // the operand region is sized for fp32 staging, the largest case
    if (k < 1 || k > TORCHFG_KNN_MAX_K || (block_q != 16 && block_q != 32)) return -1;
    return (int)Layout(block_q, k).total;
}

extern "C" int torchfg_knn_launch(
    const void* query, const void* gallery, const float* query_aux, const float* gallery_aux,
    int dtype, int64_t num_query, int64_t num_gallery, int64_t dim,
    int64_t query_stride, int64_t gallery_stride,
    int k, int metric, int symmetric, int64_t self_offset,
    int64_t split_size, int splits,
    float* out_distances, int64_t* out_indices,
    int max_dynamic_smem, cudaStream_t stream) {
    if (k < 1 || k > TORCHFG_KNN_MAX_K || metric < 0 || metric > 3 || num_query < 0 || num_gallery < 1 ||
        num_gallery >= INT_MAX || dim < 0 || splits < 1 || splits > 65535 || split_size < 1 ||
        (metric != TORCHFG_KNN_DOT && (query_aux == nullptr || gallery_aux == nullptr))) {
        return (int)cudaErrorInvalidValue;
    }
    if (num_query == 0) return (int)cudaSuccess;
    int block_q = 32;
    if (torchfg_knn_smem_bytes(dtype, k, block_q) > max_dynamic_smem) block_q = 16;
    const int smem = torchfg_knn_smem_bytes(dtype, k, block_q);
    if (smem < 0 || smem > max_dynamic_smem) return (int)cudaErrorInvalidConfiguration;

    Params p;
    p.query = query;
    p.gallery = gallery;
    p.query_aux = query_aux;
    p.gallery_aux = gallery_aux;
    p.num_query = num_query;
    p.num_gallery = num_gallery;
    p.dim = dim;
    p.query_stride = query_stride;
    p.gallery_stride = gallery_stride;
    p.self_offset = self_offset;
    p.split_size = split_size;
    p.k = k;
    p.metric = metric;
    p.symmetric = symmetric;
    p.block_q = block_q;
    p.out_distances = out_distances;
    p.out_indices = out_indices;
    switch (dtype) {
        case TORCHFG_KNN_FLOAT32: return (int)launch_typed<float>(p, splits, (size_t)smem, stream);
        case TORCHFG_KNN_FLOAT16: return (int)launch_typed<__half>(p, splits, (size_t)smem, stream);
        case TORCHFG_KNN_BFLOAT16: return (int)launch_typed<__nv_bfloat16>(p, splits, (size_t)smem, stream);
        default: return (int)cudaErrorInvalidValue;
    }
}
