// Torch binding of the k-NN CUDA kernel: the op torchfg_cuda::knn.
//
// Registered under its own namespace (torchfg_cuda) so that it never clashes with the Python
// custom ops of the torchfg:: namespace. It has a CUDA kernel only, no fake (meta) one: it is
// called by torchfg/ops/knn/cuda.py from inside the torchfg::knn custom op, whose fake
// (torchfg/ops/knn/__init__.py) is what torch.compile and fake-tensor tracing see; they never
// reach torchfg_cuda::knn itself.
//
// Builds: just in time only (torch.utils.cpp_extension.load, is_python_module=False, which loads
// the library for its registrations alone; see torchfg/ops/_cuda_extension.py and
// docs/concepts/backends.md). There is no ahead-of-time build recipe; the TORCHFG_AOT_MODULE
// branch below (the library as an importable module torchfg._C_cuda, which the loader imports
// first when present) is a hook for one, and is compiled only by torchfg/csrc/check_compile.sh.
#ifdef TORCHFG_AOT_MODULE
#include <Python.h>
#endif

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "knn_kernel.h"

namespace {

int dtype_code(const at::Tensor& t) {
    switch (t.scalar_type()) {
        case at::kFloat: return TORCHFG_KNN_FLOAT32;
        case at::kHalf: return TORCHFG_KNN_FLOAT16;
        case at::kBFloat16: return TORCHFG_KNN_BFLOAT16;
        default: TORCH_CHECK(false, "torchfg_cuda::knn: query must be float32, float16 or bfloat16, got ", t.scalar_type());
    }
    return -1;
}

// Returns (distances (splits, Q, k) fp32, indices (splits, Q, k) int64); split s covers gallery
// rows [s * split_size, (s + 1) * split_size). query_aux / gallery_aux: fp32 per-row squared
// norms (Euclidean metrics) or inverse norms (cosine); ignored for dot.
std::tuple<at::Tensor, at::Tensor> knn_cuda(
    const at::Tensor& query, const at::Tensor& gallery, const at::Tensor& query_aux, const at::Tensor& gallery_aux,
    int64_t k, int64_t metric, bool symmetric, int64_t self_offset, int64_t split_size) {
    TORCH_CHECK(query.is_cuda() && gallery.is_cuda(), "torchfg_cuda::knn: query and gallery must be CUDA tensors");
    TORCH_CHECK(query.dim() == 2 && gallery.dim() == 2, "torchfg_cuda::knn: query and gallery must be 2-D");
    TORCH_CHECK(query.size(1) == gallery.size(1), "torchfg_cuda::knn: query and gallery must have the same D");
    TORCH_CHECK(query.scalar_type() == gallery.scalar_type(), "torchfg_cuda::knn: query and gallery dtypes differ");
    TORCH_CHECK(query.get_device() == gallery.get_device(), "torchfg_cuda::knn: query and gallery devices differ");
    TORCH_CHECK(query.stride(1) == 1 && gallery.stride(1) == 1, "torchfg_cuda::knn: rows must be contiguous");
    TORCH_CHECK(split_size >= 1, "torchfg_cuda::knn: split_size must be >= 1");
    const bool uses_aux = metric != TORCHFG_KNN_DOT;
    if (uses_aux) {
        TORCH_CHECK(query_aux.scalar_type() == at::kFloat && gallery_aux.scalar_type() == at::kFloat &&
                        query_aux.is_contiguous() && gallery_aux.is_contiguous() &&
                        query_aux.numel() == query.size(0) && gallery_aux.numel() == gallery.size(0) &&
                        query_aux.is_cuda() && gallery_aux.is_cuda() &&
                        query_aux.get_device() == query.get_device() && gallery_aux.get_device() == query.get_device(),
                    "torchfg_cuda::knn: query_aux / gallery_aux must be contiguous fp32 vectors of length Q / G "
                    "on the query's CUDA device");
    }
    const int code = dtype_code(query);
    const c10::cuda::CUDAGuard guard(query.device());
    const int64_t num_query = query.size(0), num_gallery = gallery.size(0);
    const int64_t splits = num_gallery == 0 ? 1 : (num_gallery + split_size - 1) / split_size;
    auto out_d = at::empty({splits, num_query, k}, query.options().dtype(at::kFloat));
    auto out_i = at::empty({splits, num_query, k}, query.options().dtype(at::kLong));
    if (num_query == 0) return {out_d, out_i};

    int device = query.get_device();
    int max_smem = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const int err = torchfg_knn_launch(
        query.data_ptr(), gallery.data_ptr(),
        uses_aux ? query_aux.data_ptr<float>() : nullptr, uses_aux ? gallery_aux.data_ptr<float>() : nullptr,
        code, num_query, num_gallery, query.size(1), query.stride(0), gallery.stride(0),
        static_cast<int>(k), static_cast<int>(metric), symmetric ? 1 : 0, self_offset,
        split_size, static_cast<int>(splits),
        out_d.data_ptr<float>(), out_i.data_ptr<int64_t>(),
        max_smem, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err != cudaErrorInvalidConfiguration, "torchfg_cuda::knn: k=", k,
                " needs more shared memory than this device offers per block (", max_smem, " bytes)");
    TORCH_CHECK(err == cudaSuccess, "torchfg_cuda::knn: launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
    return {out_d, out_i};
}

// Smallest shared memory (bytes) any configuration needs for this dtype code and k, -1 if k is
// out of range; non-decreasing in k, so Python finds the device's largest k by bisection.
int64_t knn_smem_bytes(int64_t dtype, int64_t k) {
    return torchfg_knn_smem_bytes(static_cast<int>(dtype), static_cast<int>(k));
}

// The configuration a launch uses for this dtype code and k on a device offering max_smem bytes
// per block: [table index (-1: none fits), block_q, block_g, block_d, stages, candidates,
// smem_bytes].
std::vector<int64_t> knn_config(int64_t dtype, int64_t k, int64_t max_smem) {
    const TorchfgKnnConfig c = torchfg_knn_config(static_cast<int>(dtype), static_cast<int>(k), static_cast<int>(max_smem));
    return {c.index, c.block_q, c.block_g, c.block_d, c.stages, c.candidates, c.smem_bytes};
}

}  // namespace

TORCH_LIBRARY(torchfg_cuda, m) {
    m.def("knn(Tensor query, Tensor gallery, Tensor query_aux, Tensor gallery_aux, int k, int metric, "
          "bool symmetric, int self_offset, int split_size) -> (Tensor, Tensor)");
    m.def("knn_smem_bytes(int dtype, int k) -> int", &knn_smem_bytes);
    m.def("knn_config(int dtype, int k, int max_smem) -> int[]", &knn_config);
}

TORCH_LIBRARY_IMPL(torchfg_cuda, CUDA, m) {
    m.impl("knn", &knn_cuda);
}

#ifdef TORCHFG_AOT_MODULE
// Importing torchfg._C_cuda loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C_cuda(void) {
    static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "torchfg CUDA kernels: torch.ops.torchfg_cuda", -1,
                                 nullptr, nullptr, nullptr, nullptr, nullptr};
    return PyModule_Create(&module);
}
#endif
