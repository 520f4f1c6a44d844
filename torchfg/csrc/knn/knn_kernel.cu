// Exact k-nearest-neighbour search: a pipelined tensor-core (fp16/bf16) or register-blocked FMA
// (fp32) distance tile per block, a per-query running top-k list in shared memory, and block-wide
// merges of the candidates each tile lets through.
//
// One block owns BQ queries (16 or 32, from the per-k table below) and one contiguous gallery
// range (a split). For every 64-row gallery tile it
//   1. computes the BQ x 64 tile of inner products over 64-byte column slices of D, staged in
//      shared memory by 16-byte cp.async copies through a STAGES-deep ring (one __syncthreads per
//      slice; the first slices of the next tile are requested before this tile's top-k work, so
//      the copies overlap it). fp16/bf16: mma.sync m16n8k16 with fp32 accumulators, operands
//      read with ldmatrix; fp32: each thread accumulates a (BQ/16) x 4 register block from 16-byte
//      shared-memory vectors. Rows outside the matrix and columns past D are zero-filled by the
//      copy itself, so any Q, G and D work;
//   2. finishes the metric in the accumulator registers (row statistics, self exclusion, exact
//      diagonal) and writes the fp32 distance tile to shared memory;
//   3. each warp runs the queries it owns over the tile: a pair enters the query's candidate buffer
//      when it is below the query's current k-th distance (warp ballot, no atomics);
//   4. when some buffer could overflow on the next tile, all warps merge every buffer into its
//      list together: a bitonic sort of the buffers, then each element's final rank by binary
//      search in the other sorted sequence, lists moved in place from the back in block-wide
//      rounds (an element only moves up, so a round reads before anything lands on it).
// Pairs are ordered by (distance, gallery index). Tiles are visited in increasing index order, so
// a new pair can only beat an equal listed distance if it is strictly smaller: the strict "<"
// filter keeps ties on the lower index, and the merge sorts on the pair.
//
// No torch headers: this file compiles standalone with nvcc (see torchfg/csrc/check_compile.sh).

#include "knn_kernel.h"

#include <cfloat>
#include <climits>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockG = 64;              // gallery rows per tile
constexpr int kSliceBytes = 64;          // bytes of a row per pipeline stage (4 cp.async chunks)
constexpr int kChunks = kSliceBytes / 16;
// Row pitch of a staged slice: 80 bytes puts the 8 rows an ldmatrix (or a quarter warp's 16-byte
// loads) touches on 8 distinct 16-byte bank groups, and keeps every chunk 16-byte aligned.
constexpr int kPitchBytes = kSliceBytes + 16;
constexpr int kPitchTile = kBlockG + 4;  // fp32 distance tile row pitch (floats)
constexpr int kCand = 128;               // candidate buffer per query; power of two (bitonic sort)
constexpr int kMergeItems = 4;           // list elements per thread per in-place merge round
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kCand >= 2 * kBlockG, "after a merge a buffer must take a whole tile");
static_assert((kCand & (kCand - 1)) == 0, "bitonic sort needs a power of two");

// The per-k configuration table. A k uses the first row whose max_k covers it; where the device
// lacks the shared memory for that row, the next rows (smaller footprints) are tried. Footprints
// on sm_90 (227 KB per block, 228 KB per SM, 1 KB reserved per block) with kCand = 128:
//   row 0, BQ 32, 3 stages, k <= 128:   71 KB (k = 1)   .. 103 KB (k = 128)  -> 2-3 blocks/SM
//   row 1, BQ 16, 3 stages, k <= 512:   59 KB (k = 129) .. 107 KB (k = 512)  -> 2 blocks/SM
//   row 2, BQ 16, 2 stages, k <= 1024: 101 KB (k = 513) .. 165 KB (k = 1024) -> 1-2 blocks/SM
// (the lists, 8 bytes per slot and query, dominate; torchfg/csrc/knn_ptxas_report.py writes the
// table with registers and blocks per SM to benchmarks/results/knn_cuda_ptxas_sm90.csv).
struct ConfigRow {
    int block_q, stages, max_k, min_blocks;
};
constexpr ConfigRow kConfigs[] = {{32, 3, 128, 2}, {16, 3, 512, 2}, {16, 2, TORCHFG_KNN_MAX_K, 1}};
constexpr int kNumConfigs = sizeof(kConfigs) / sizeof(kConfigs[0]);

struct Params {
    const void* query;
    const void* gallery;
    const float* query_aux;
    const float* gallery_aux;
    int64_t num_query, num_gallery, dim, query_stride, gallery_stride;
    int64_t self_offset, split_size;
    int k, metric, symmetric, aligned;
    float* out_distances;
    int64_t* out_indices;
};

__host__ __device__ constexpr size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Byte offsets of the shared-memory regions of a block of `block_q` queries.
struct Layout {
    size_t operands, scratch, q_aux, cand_d, cand_i, list_d, list_i, list_len, cand_count, thresh, flag, total;
    __host__ __device__ Layout(int block_q, int stages, int k) {
        const size_t tile_bytes = (size_t)block_q * kPitchTile * sizeof(float);
        const size_t rank_bytes = (size_t)block_q * kCand * sizeof(int);
        operands = 0;
        // The distance tile and, during a merge, the candidates' ranks (never live together).
        scratch = align_up(operands + (size_t)stages * (block_q + kBlockG) * kPitchBytes, 128);
        q_aux = align_up(scratch + (tile_bytes > rank_bytes ? tile_bytes : rank_bytes), 16);
        cand_d = align_up(q_aux + (size_t)block_q * sizeof(float), 16);
        cand_i = align_up(cand_d + (size_t)block_q * kCand * sizeof(float), 16);
        list_d = align_up(cand_i + (size_t)block_q * kCand * sizeof(int), 16);
        list_i = align_up(list_d + (size_t)block_q * k * sizeof(float), 16);
        list_len = align_up(list_i + (size_t)block_q * k * sizeof(int), 16);
        cand_count = align_up(list_len + (size_t)block_q * sizeof(int), 16);
        thresh = align_up(cand_count + (size_t)block_q * sizeof(int), 16);
        flag = align_up(thresh + (size_t)block_q * sizeof(float), 16);
        total = align_up(flag + sizeof(int), 16);
    }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
    if constexpr (std::is_same<T, __half>::value) return __half2float(v);
    else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat162float(v);
    else return v;
}

// Whether this device pass runs T through mma.sync (m16n8k16 f16/bf16 needs sm_80).
template <typename T>
__device__ constexpr bool use_tensor_cores() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
#else
    return false;
#endif
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy of src_bytes (0..16) bytes, the rest zero-filled.
__device__ __forceinline__ void copy16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
#else
    uint4 v = make_uint4(0, 0, 0, 0);
    if (src_bytes == 16) {
        v = *static_cast<const uint4*>(src);
    } else {
        unsigned char* bytes = reinterpret_cast<unsigned char*>(&v);
        for (int b = 0; b < src_bytes; ++b) bytes[b] = static_cast<const unsigned char*>(src)[b];
    }
    *static_cast<uint4*>(dst) = v;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ bool lex_less(float a_d, int a_i, float b_d, int b_i) {
    return a_d < b_d || (a_d == b_d && a_i < b_i);
}

// Number of the first n entries of the sorted (d, i) sequence that are lexicographically below (d, i).
__device__ __forceinline__ int count_less(const float* seq_d, const int* seq_i, int n, float d, int i) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (lex_less(seq_d[mid], seq_i[mid], d, i)) lo = mid + 1; else hi = mid;
    }
    return lo;
}

__device__ __forceinline__ float finish_distance(float dot, float q_aux, float g_aux, int metric) {
    switch (metric) {
        case TORCHFG_KNN_SQEUCLIDEAN: return fmaxf(q_aux + g_aux - 2.0f * dot, 0.0f);
        case TORCHFG_KNN_EUCLIDEAN: return sqrtf(fmaxf(q_aux + g_aux - 2.0f * dot, 0.0f));
        // Clamped as the PyTorch path's finish: a duplicate row must tie with the row's own 0.
        case TORCHFG_KNN_COSINE: return fmaxf(1.0f - dot * q_aux * g_aux, 0.0f);
        default: return -dot;
    }
}

template <typename T, int BQ, int STAGES>
struct Tile {
    static constexpr int kBlockD = kSliceBytes / (int)sizeof(T);  // elements per staged slice
    static constexpr int kElemsPerChunk = 16 / (int)sizeof(T);
    static constexpr int kStageBytes = (BQ + kBlockG) * kPitchBytes;
    // mma layout: BQ / 16 warps down the queries, the rest across the 64 gallery rows.
    static constexpr int kWarpsM = BQ / 16;
    static constexpr int kWarpsN = kWarps / kWarpsM;
    static constexpr int kWarpN = kBlockG / kWarpsN;  // gallery rows per warp
    static constexpr int kNTiles = kWarpN / 8;
    // FMA layout: 16 x 16 threads, each (BQ / 16) query rows x 4 gallery rows, both strided by 16.
    static constexpr int kTM = BQ / 16;
    static constexpr int kTN = kBlockG / 16;
    static_assert(BQ % 16 == 0 && kWarpsM >= 1 && kWarpsM <= kWarps && kNTiles >= 1, "tile shape");
    static_assert(kTN == 4 && kTM * 16 == BQ, "FMA path: 4 gallery rows, BQ / 16 query rows per thread");
};

// Requests slice `slice` (columns [slice * BD, (slice + 1) * BD)) of the block's query rows and of
// gallery rows [g0, g0 + 64) into one pipeline stage. Rows past the matrix are zero-filled.
template <typename T, int BQ, int STAGES>
__device__ __forceinline__ void load_stage(const Params& p, unsigned char* stage, int64_t q0, int64_t g0, int slice) {
    using Cfg = Tile<T, BQ, STAGES>;
    const int64_t col0 = (int64_t)slice * Cfg::kBlockD;
    for (int c = threadIdx.x; c < (BQ + kBlockG) * kChunks; c += kThreads) {
        const int row = c / kChunks, chunk = c % kChunks;
        const bool is_query = row < BQ;
        const int64_t grow = is_query ? q0 + row : g0 + (row - BQ);
        const int64_t rows = is_query ? p.num_query : p.num_gallery;
        const T* base = static_cast<const T*>(is_query ? p.query : p.gallery);
        const int64_t stride = is_query ? p.query_stride : p.gallery_stride;
        const int64_t col = col0 + chunk * Cfg::kElemsPerChunk;
        int64_t elems = grow < rows ? p.dim - col : 0;
        elems = elems < 0 ? 0 : (elems > Cfg::kElemsPerChunk ? Cfg::kElemsPerChunk : elems);
        unsigned char* dst = stage + row * kPitchBytes + chunk * 16;
        const T* src = elems > 0 ? base + grow * stride + col : base;
        if (p.aligned) {
            copy16(dst, src, (int)elems * (int)sizeof(T));
        } else {
            // Rows not 16-byte aligned (odd D or strides): element copies, synchronous.
            using Raw = typename std::conditional<sizeof(T) == 2, unsigned short, unsigned int>::type;
            Raw* d = reinterpret_cast<Raw*>(dst);
            const Raw* s = reinterpret_cast<const Raw*>(src);
#pragma unroll
            for (int e = 0; e < Cfg::kElemsPerChunk; ++e) d[e] = e < elems ? s[e] : Raw(0);
        }
    }
}

// Waits for slice s of the current tile, then requests slice s + STAGES - 1 into the stage that
// slice s - 1 used; returns slice s's stage. Every thread calls it (it holds a block barrier).
template <typename T, int BQ, int STAGES>
__device__ __forceinline__ const unsigned char* begin_slice(const Params& p, unsigned char* operands, int64_t q0,
                                                            int64_t g0, int s, int slices) {
    using Cfg = Tile<T, BQ, STAGES>;
    cp_async_wait<STAGES - 2>();
    // Slice s has landed for every thread, and every warp is done with slice s - 1, whose stage
    // the next request reuses.
    __syncthreads();
    if (s + STAGES - 1 < slices) {
        load_stage<T, BQ, STAGES>(p, operands + ((s + STAGES - 1) % STAGES) * Cfg::kStageBytes, q0, g0, s + STAGES - 1);
    }
    cp_async_commit();
    return operands + (s % STAGES) * Cfg::kStageBytes;
}

// After the last slice of a tile: requests the first STAGES - 1 slices of the tile at g_next (if
// < g_end), one commit group each, so that they land while this tile's top-k work runs.
template <typename T, int BQ, int STAGES>
__device__ __forceinline__ void request_next_tile(const Params& p, unsigned char* operands, int64_t q0, int64_t g_next,
                                                  int64_t g_end, int slices) {
    using Cfg = Tile<T, BQ, STAGES>;
    __syncthreads();  // every warp is done with the stages the next requests overwrite
    if (g_next < g_end) {
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < slices) load_stage<T, BQ, STAGES>(p, operands + s * Cfg::kStageBytes, q0, g_next, s);
            cp_async_commit();
        }
    }
}

// Four consecutive staged elements as floats (16-byte or 8-byte shared-memory vector).
template <typename T>
__device__ __forceinline__ float4 load4(const unsigned char* p) {
    if constexpr (std::is_same<T, float>::value) {
        return *reinterpret_cast<const float4*>(p);
    } else {
        const T* v = reinterpret_cast<const T*>(p);
        return make_float4(to_float<T>(v[0]), to_float<T>(v[1]), to_float<T>(v[2]), to_float<T>(v[3]));
    }
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    if constexpr (std::is_same<T, __half>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// Distance of the block's query row r to gallery column c of the tile from their inner product.
__device__ __forceinline__ float tile_distance(const Params& p, const float* s_qaux, int r, int c, int64_t q0,
                                              int64_t g0, int64_t g_end, float dot) {
    const int64_t qg = q0 + r, j = g0 + c;
    if (j >= g_end || (p.self_offset >= 0 && j == qg + p.self_offset)) return INFINITY;
    const float q_aux = s_qaux[r];
    const float g_aux = p.metric == TORCHFG_KNN_DOT ? 0.0f : __ldg(p.gallery_aux + j);
    float d = finish_distance(dot, q_aux, g_aux, p.metric);
    if (p.symmetric && j == qg) {
        if (p.metric == TORCHFG_KNN_COSINE) d = q_aux > 0.0f ? 0.0f : d;
        else if (p.metric != TORCHFG_KNN_DOT) d = 0.0f;
    }
    return d;
}

// Inner products of the block's queries with gallery rows [g0, g0 + 64), finished into distances
// in `tile`. Expects the first STAGES - 1 slices of this tile requested (one commit group each);
// before returning, requests those of the tile at g_next (if < g_end) the same way.
template <typename T, int BQ, int STAGES>
__device__ __forceinline__ void distance_tile(const Params& p, unsigned char* operands, const float* s_qaux,
                                              float* tile, int64_t q0, int64_t g0, int64_t g_next, int64_t g_end,
                                              int slices) {
    using Cfg = Tile<T, BQ, STAGES>;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if constexpr (use_tensor_cores<T>()) {
        const int warp_m = warp / Cfg::kWarpsN, warp_n = warp % Cfg::kWarpsN;
        float acc[Cfg::kNTiles][4];
#pragma unroll
        for (int n = 0; n < Cfg::kNTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
        for (int s = 0; s < slices; ++s) {
            const unsigned char* sa = begin_slice<T, BQ, STAGES>(p, operands, q0, g0, s, slices);
            const unsigned char* sb = sa + BQ * kPitchBytes;
#pragma unroll
            for (int kk = 0; kk < kSliceBytes; kk += 32) {  // 32 bytes = k16 of 16-bit elements
                unsigned a[4];
                const unsigned char* pa = sa + (warp_m * 16 + lane % 16) * kPitchBytes + kk + (lane / 16) * 16;
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                             : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                             : "r"(smem_addr(pa)));
#pragma unroll
                for (int n = 0; n < Cfg::kNTiles; ++n) {
                    unsigned b[2];
                    // Gallery rows are the columns of B, stored k-contiguous: ldmatrix without
                    // .trans yields the col-major B fragment. Lanes 16..31 repeat valid addresses.
                    const unsigned char* pb = sb + (warp_n * Cfg::kWarpN + n * 8 + lane % 8) * kPitchBytes + kk +
                                              ((lane / 8) % 2) * 16;
                    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                                 : "=r"(b[0]), "=r"(b[1])
                                 : "r"(smem_addr(pb)));
                    mma_16816<T>(acc[n], a, b);
                }
            }
        }
        request_next_tile<T, BQ, STAGES>(p, operands, q0, g_next, g_end, slices);
#pragma unroll
        for (int n = 0; n < Cfg::kNTiles; ++n) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = warp_m * 16 + lane / 4 + 8 * h;
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = warp_n * Cfg::kWarpN + n * 8 + 2 * (lane % 4) + e;
                    tile[r * kPitchTile + c] = tile_distance(p, s_qaux, r, c, q0, g0, g_end, acc[n][2 * h + e]);
                }
            }
        }
    } else {
        const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
        float acc[Cfg::kTM][Cfg::kTN];
#pragma unroll
        for (int i = 0; i < Cfg::kTM; ++i)
#pragma unroll
            for (int j = 0; j < Cfg::kTN; ++j) acc[i][j] = 0.0f;
        for (int s = 0; s < slices; ++s) {
            const unsigned char* sa = begin_slice<T, BQ, STAGES>(p, operands, q0, g0, s, slices);
            const unsigned char* sb = sa + BQ * kPitchBytes;
#pragma unroll
            for (int kk = 0; kk < Cfg::kBlockD; kk += 4) {
                float4 a[Cfg::kTM], b[Cfg::kTN];
#pragma unroll
                for (int i = 0; i < Cfg::kTM; ++i) a[i] = load4<T>(sa + (tr + 16 * i) * kPitchBytes + kk * sizeof(T));
#pragma unroll
                for (int j = 0; j < Cfg::kTN; ++j) b[j] = load4<T>(sb + (tc + 16 * j) * kPitchBytes + kk * sizeof(T));
#pragma unroll
                for (int i = 0; i < Cfg::kTM; ++i) {
#pragma unroll
                    for (int j = 0; j < Cfg::kTN; ++j) {
                        acc[i][j] = fmaf(a[i].x, b[j].x, acc[i][j]);
                        acc[i][j] = fmaf(a[i].y, b[j].y, acc[i][j]);
                        acc[i][j] = fmaf(a[i].z, b[j].z, acc[i][j]);
                        acc[i][j] = fmaf(a[i].w, b[j].w, acc[i][j]);
                    }
                }
            }
        }
        request_next_tile<T, BQ, STAGES>(p, operands, q0, g_next, g_end, slices);
#pragma unroll
        for (int i = 0; i < Cfg::kTM; ++i) {
#pragma unroll
            for (int j = 0; j < Cfg::kTN; ++j) {
                const int r = tr + 16 * i, c = tc + 16 * j;
                tile[r * kPitchTile + c] = tile_distance(p, s_qaux, r, c, q0, g0, g_end, acc[i][j]);
            }
        }
    }
}

// Merges every query's candidate buffer into its sorted list, all warps together. Starts and ends
// at a block-wide barrier.
template <int BQ>
__device__ void merge_block(int k, int* rank, float* cand_d, int* cand_i, float* list_d, int* list_i, int* list_len,
                            int* cand_count, float* thresh) {
    for (int t = threadIdx.x; t < BQ * kCand; t += kThreads) {
        const int q = t / kCand;
        if (t % kCand >= cand_count[q]) { cand_d[t] = INFINITY; cand_i[t] = INT_MAX; }
    }
    __syncthreads();
    // Bitonic sort of each buffer on (distance, index); empty buffers are skipped.
    for (int size = 2; size <= kCand; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = threadIdx.x; t < BQ * (kCand / 2); t += kThreads) {
                const int q = t / (kCand / 2), u = t % (kCand / 2);
                if (cand_count[q] == 0) continue;
                const int i = q * kCand + 2 * stride * (u / stride) + (u % stride);
                const int j = i + stride;
                const bool ascending = ((i % kCand) & size) == 0;
                const float di = cand_d[i], dj = cand_d[j];
                const int ii = cand_i[i], ij = cand_i[j];
                if (lex_less(dj, ij, di, ii) == ascending) {
                    cand_d[i] = dj; cand_i[i] = ij;
                    cand_d[j] = di; cand_i[j] = ii;
                }
            }
            __syncthreads();
        }
    }
    // Final rank of every candidate among list + buffer (keys are unique: distinct indices), taken
    // before any list entry moves.
    for (int t = threadIdx.x; t < BQ * kCand; t += kThreads) {
        const int q = t / kCand, r = t % kCand;
        if (r < cand_count[q]) {
            rank[t] = r + count_less(list_d + (size_t)q * k, list_i + (size_t)q * k, list_len[q], cand_d[t], cand_i[t]);
        }
    }
    __syncthreads();
    // List entries only move up: rounds of kPositions positions per query from the back, each read
    // completely before it writes, never write over a position a later round still has to read.
    constexpr int kPositions = kThreads * kMergeItems / BQ;
    static_assert(kPositions * BQ == kThreads * kMergeItems, "merge rounds cover whole rows");
    for (int base = ((k - 1) / kPositions) * kPositions; base >= 0; base -= kPositions) {
        float d[kMergeItems];
        int idx[kMergeItems], dest[kMergeItems];
#pragma unroll
        for (int it = 0; it < kMergeItems; ++it) {
            const int item = threadIdx.x + kThreads * it;
            const int q = item / kPositions, pos = base + item % kPositions;
            dest[it] = -1;
            d[it] = 0.0f;
            idx[it] = 0;
            const int n = cand_count[q];
            if (n > 0 && pos < list_len[q]) {
                d[it] = list_d[(size_t)q * k + pos];
                idx[it] = list_i[(size_t)q * k + pos];
                const int to = pos + count_less(cand_d + q * kCand, cand_i + q * kCand, n, d[it], idx[it]);
                dest[it] = to < k && to != pos ? q * k + to : -1;
            }
        }
        __syncthreads();
#pragma unroll
        for (int it = 0; it < kMergeItems; ++it) {
            if (dest[it] >= 0) { list_d[dest[it]] = d[it]; list_i[dest[it]] = idx[it]; }
        }
        __syncthreads();
    }
    for (int t = threadIdx.x; t < BQ * kCand; t += kThreads) {
        const int q = t / kCand, r = t % kCand;
        if (r < cand_count[q] && rank[t] < k) {
            list_d[(size_t)q * k + rank[t]] = cand_d[t];
            list_i[(size_t)q * k + rank[t]] = cand_i[t];
        }
    }
    __syncthreads();
    for (int q = threadIdx.x; q < BQ; q += kThreads) {
        const int len = min(k, list_len[q] + cand_count[q]);
        list_len[q] = len;
        cand_count[q] = 0;
        thresh[q] = len == k ? list_d[(size_t)q * k + k - 1] : INFINITY;
    }
    __syncthreads();
}

template <typename T, int BQ, int STAGES, int MIN_BLOCKS>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) knn_kernel(Params p) {
    using Cfg = Tile<T, BQ, STAGES>;
    extern __shared__ __align__(128) unsigned char smem[];
    const Layout lay(BQ, STAGES, p.k);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int k = p.k;
    const int64_t q0 = (int64_t)blockIdx.x * BQ;
    const int64_t g_begin = (int64_t)blockIdx.y * p.split_size;
    const int64_t g_end = min(g_begin + p.split_size, p.num_gallery);
    const int slices = (int)((p.dim + Cfg::kBlockD - 1) / Cfg::kBlockD);

    unsigned char* operands = smem + lay.operands;
    float* tile = reinterpret_cast<float*>(smem + lay.scratch);
    int* rank = reinterpret_cast<int*>(smem + lay.scratch);
    float* s_qaux = reinterpret_cast<float*>(smem + lay.q_aux);
    float* cand_d = reinterpret_cast<float*>(smem + lay.cand_d);
    int* cand_i = reinterpret_cast<int*>(smem + lay.cand_i);
    float* list_d = reinterpret_cast<float*>(smem + lay.list_d);
    int* list_i = reinterpret_cast<int*>(smem + lay.list_i);
    int* list_len = reinterpret_cast<int*>(smem + lay.list_len);
    int* cand_count = reinterpret_cast<int*>(smem + lay.cand_count);
    float* thresh = reinterpret_cast<float*>(smem + lay.thresh);
    int* need_merge = reinterpret_cast<int*>(smem + lay.flag);

    if (g_begin < g_end) {
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < slices) load_stage<T, BQ, STAGES>(p, operands + s * Cfg::kStageBytes, q0, g_begin, s);
            cp_async_commit();
        }
    }
    for (int i = threadIdx.x; i < BQ; i += kThreads) {
        list_len[i] = 0;
        cand_count[i] = 0;
        thresh[i] = INFINITY;
        s_qaux[i] = (p.metric == TORCHFG_KNN_DOT || q0 + i >= p.num_query) ? 0.0f : p.query_aux[q0 + i];
    }
    if (threadIdx.x == 0) *need_merge = 0;
    __syncthreads();

    for (int64_t g0 = g_begin; g0 < g_end; g0 += kBlockG) {
        distance_tile<T, BQ, STAGES>(p, operands, s_qaux, tile, q0, g0, g0 + kBlockG, g_end, slices);
        __syncthreads();
        // Each warp filters the queries it owns against their running k-th distance.
        for (int qi = warp; qi < BQ; qi += kWarps) {
            if (q0 + qi >= p.num_query) break;  // warp-uniform
            const float limit = thresh[qi];
            int count = cand_count[qi];
            float* my_d = cand_d + qi * kCand;
            int* my_i = cand_i + qi * kCand;
#pragma unroll
            for (int c = lane; c < kBlockG; c += 32) {
                const float d = tile[qi * kPitchTile + c];
                const bool keep = d < limit;
                const unsigned ballot = __ballot_sync(kFullMask, keep);
                if (keep) {
                    const int pos = count + __popc(ballot & ((1u << lane) - 1u));
                    my_d[pos] = d;
                    my_i[pos] = (int)(g0 + c);
                }
                count += __popc(ballot);
            }
            if (lane == 0) {
                cand_count[qi] = count;
                if (count > kCand - kBlockG) *need_merge = 1;
            }
        }
        __syncthreads();
        if (*need_merge) {  // block-uniform: read between two barriers
            merge_block<BQ>(k, rank, cand_d, cand_i, list_d, list_i, list_len, cand_count, thresh);
            if (threadIdx.x == 0) *need_merge = 0;
            __syncthreads();
        }
    }
    cp_async_wait<0>();
    merge_block<BQ>(k, rank, cand_d, cand_i, list_d, list_i, list_len, cand_count, thresh);

    for (int t = threadIdx.x; t < BQ * k; t += kThreads) {
        const int q = t / k, slot = t % k;
        const int64_t qg = q0 + q;
        if (qg >= p.num_query) break;  // t only grows
        const size_t out = ((size_t)blockIdx.y * p.num_query + qg) * k + slot;
        const bool have = slot < list_len[q];
        p.out_distances[out] = have ? list_d[t] : INFINITY;
        p.out_indices[out] = have ? (int64_t)list_i[t] : (int64_t)-1;
    }
}

template <typename T, int C>
cudaError_t launch_config(const Params& p, int splits, size_t smem_bytes, cudaStream_t stream) {
    constexpr ConfigRow row = kConfigs[C];
    auto kernel = knn_kernel<T, row.block_q, row.stages, row.min_blocks>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes);
    if (err != cudaSuccess) return err;
    // Two blocks per SM need the whole unified L1/shared array as shared memory.
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (err != cudaSuccess) return err;
    const dim3 grid((unsigned)((p.num_query + row.block_q - 1) / row.block_q), (unsigned)splits);
    kernel<<<grid, kThreads, smem_bytes, stream>>>(p);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const Params& p, int config, int splits, size_t smem_bytes, cudaStream_t stream) {
    static_assert(kNumConfigs == 3, "one case per table row");
    switch (config) {
        case 0: return launch_config<T, 0>(p, splits, smem_bytes, stream);
        case 1: return launch_config<T, 1>(p, splits, smem_bytes, stream);
        case 2: return launch_config<T, 2>(p, splits, smem_bytes, stream);
        default: return cudaErrorInvalidValue;
    }
}

int element_size(int dtype) { return dtype == TORCHFG_KNN_FLOAT32 ? 4 : 2; }

TorchfgKnnConfig describe(int index, int dtype, int k) {
    TorchfgKnnConfig c;
    c.index = index;
    c.block_q = kConfigs[index].block_q;
    c.block_g = kBlockG;
    c.block_d = kSliceBytes / element_size(dtype);
    c.stages = kConfigs[index].stages;
    c.candidates = kCand;
    c.smem_bytes = (int)Layout(c.block_q, c.stages, k).total;
    return c;
}

}  // namespace

extern "C" TorchfgKnnConfig torchfg_knn_config(int dtype, int k, int max_dynamic_smem) {
    TorchfgKnnConfig none = {-1, 0, 0, 0, 0, 0, -1};
    if (k < 1 || k > TORCHFG_KNN_MAX_K || dtype < TORCHFG_KNN_FLOAT32 || dtype > TORCHFG_KNN_BFLOAT16) return none;
    int first = 0;
    while (first < kNumConfigs - 1 && k > kConfigs[first].max_k) ++first;
    for (int i = first; i < kNumConfigs; ++i) {
        const TorchfgKnnConfig c = describe(i, dtype, k);
        if (c.smem_bytes <= max_dynamic_smem) return c;
    }
    return none;
}

extern "C" int torchfg_knn_smem_bytes(int dtype, int k) {
    if (k < 1 || k > TORCHFG_KNN_MAX_K || dtype < TORCHFG_KNN_FLOAT32 || dtype > TORCHFG_KNN_BFLOAT16) return -1;
    int best = INT_MAX;
    for (int i = 0; i < kNumConfigs; ++i) {
        const int bytes = describe(i, dtype, k).smem_bytes;
        best = bytes < best ? bytes : best;
    }
    return best;
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
    const TorchfgKnnConfig config = torchfg_knn_config(dtype, k, max_dynamic_smem);
    if (config.index < 0) return (int)cudaErrorInvalidConfiguration;

    const int es = element_size(dtype);
    const bool aligned = reinterpret_cast<uintptr_t>(query) % 16 == 0 && reinterpret_cast<uintptr_t>(gallery) % 16 == 0 &&
                         (query_stride * es) % 16 == 0 && (gallery_stride * es) % 16 == 0;
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
    p.aligned = aligned ? 1 : 0;
    p.out_distances = out_distances;
    p.out_indices = out_indices;
    const size_t smem = (size_t)config.smem_bytes;
    switch (dtype) {
        case TORCHFG_KNN_FLOAT32: return (int)launch_typed<float>(p, config.index, splits, smem, stream);
        case TORCHFG_KNN_FLOAT16: return (int)launch_typed<__half>(p, config.index, splits, smem, stream);
        case TORCHFG_KNN_BFLOAT16: return (int)launch_typed<__nv_bfloat16>(p, config.index, splits, smem, stream);
        default: return (int)cudaErrorInvalidValue;
    }
}
