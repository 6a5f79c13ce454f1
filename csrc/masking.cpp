// torch.ops.mae_fast.random_masking: MAE's random-masking indices (ids_keep, ids_restore, mask) in
// one pass instead of the official argsort / argsort / slice / ones / fill / gather, with the
// official semantics (mae_fast/reference.py::masking_indices; ties broken by index, see
// masking_index.h). Schema, argument checks, the CPU implementation, and the CUDA entry point
// (kernel in cuda/masking_kernels.cu). The rank arithmetic shared with the kernel: masking_index.h.
#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "masking_cuda.h"
#include "masking_index.h"

#ifdef MAE_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mae_fast {
namespace masking {
namespace {

using at::Tensor;
using Outputs = std::tuple<Tensor, Tensor, Tensor>;

Dims check_args(const Tensor& noise, int64_t len_keep) {
  TORCH_CHECK(noise.dim() == 2, "mae_fast.random_masking: noise must be (N, L), got shape ", noise.sizes());
  const at::ScalarType t = noise.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "mae_fast.random_masking: noise must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(noise.is_contiguous(), "mae_fast.random_masking: noise must be contiguous (call .contiguous()); got "
              "strides ", noise.strides(), " for shape ", noise.sizes());
  const int64_t N = noise.size(0), L = noise.size(1);
  TORCH_CHECK(L <= kMaxL, "mae_fast.random_masking: L = ", L, " is too long (at most ", kMaxL,
              "; the rank of an element costs O(L)): use backend='reference' (torch.argsort)");
  TORCH_CHECK(len_keep >= 0 && len_keep <= L, "mae_fast.random_masking: len_keep = ", len_keep,
              " must be in [0, L = ", L, "]");
  return Dims{N, L, len_keep};
}

Outputs empty_outputs(const Tensor& noise, const Dims& d) {
  const auto index = noise.options().dtype(at::kLong);
  return {at::empty({d.N, d.len_keep}, index), at::empty({d.N, d.L}, index),
          at::empty({d.N, d.L}, noise.options().dtype(at::kFloat))};
}

// ---------------------------------------------------------------------------------------------
// CPU: rows in parallel; each row's keys into a thread-local buffer, then every element ranked
// with the same stable_rank / write_outputs the CUDA kernel runs.
// ---------------------------------------------------------------------------------------------
Outputs random_masking_cpu(const Tensor& noise, int64_t len_keep) {
  TORCH_CHECK(noise.device().is_cpu(), "mae_fast.random_masking (CPU kernel): noise is on ", noise.device());
  const Dims dims = check_args(noise, len_keep);
  auto [ids_keep, ids_restore, mask] = empty_outputs(noise, dims);
  if (dims.N == 0 || dims.L == 0) return {ids_keep, ids_restore, mask};
  // a row costs ~L^2 compares
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, dims.L * dims.L));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(), "random_masking_cpu", [&] {
    using key_t = Key<scalar_t>;
    const scalar_t* noise_ptr = noise.const_data_ptr<scalar_t>();
    int64_t* keep_ptr = ids_keep.mutable_data_ptr<int64_t>();
    int64_t* restore_ptr = ids_restore.mutable_data_ptr<int64_t>();
    float* mask_ptr = mask.mutable_data_ptr<float>();
    at::parallel_for(0, dims.N, grain, [&](int64_t begin, int64_t end) {
      std::vector<key_t> keys(static_cast<size_t>(dims.L));
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* row = noise_ptr + n * dims.L;
        for (int64_t l = 0; l < dims.L; ++l) keys[l] = key_of(row[l]);
        for (int64_t l = 0; l < dims.L; ++l) {
          write_outputs(dims, n, l, stable_rank(keys.data(), dims.L, l), keep_ptr, restore_ptr, mask_ptr);
        }
      }
    });
  });
  return {ids_keep, ids_restore, mask};
}

// ---------------------------------------------------------------------------------------------
// CUDA (kernel in cuda/masking_kernels.cu)
// ---------------------------------------------------------------------------------------------
#ifdef MAE_FAST_WITH_CUDA
Outputs random_masking_cuda(const Tensor& noise, int64_t len_keep) {
  TORCH_CHECK(noise.device().is_cuda(), "mae_fast.random_masking (CUDA kernel): noise is on ", noise.device());
  const Dims dims = check_args(noise, len_keep);
  const c10::cuda::CUDAGuard guard(noise.device());
  const int64_t max_L = max_row_length(noise.scalar_type(), noise.get_device());
  TORCH_CHECK(dims.L <= max_L, "mae_fast.random_masking (CUDA kernel): L = ", dims.L, " is too long: a row's ",
              noise.scalar_type(), " sort keys must fit in one block's shared memory on this GPU (L <= ", max_L,
              "); use backend='reference' (torch.argsort) for rows this long");
  TORCH_CHECK(dims.N <= std::numeric_limits<int32_t>::max(), "mae_fast.random_masking (CUDA kernel): N = ", dims.N,
              " rows exceed the grid limit (one block per row, at most 2^31 - 1)");
  auto [ids_keep, ids_restore, mask] = empty_outputs(noise, dims);
  launch_random_masking(noise.scalar_type(), noise.const_data_ptr(), ids_keep.mutable_data_ptr<int64_t>(),
                        ids_restore.mutable_data_ptr<int64_t>(), mask.mutable_data_ptr<float>(), dims,
                        c10::cuda::getCurrentCUDAStream());
  return {ids_keep, ids_restore, mask};
}
#endif  // MAE_FAST_WITH_CUDA

}  // namespace
}  // namespace masking
}  // namespace mae_fast

// A fragment: TORCH_LIBRARY(mae_fast, m) itself is in unshuffle.cpp (one per namespace).
TORCH_LIBRARY_FRAGMENT(mae_fast, m) {
  // register_fake lives in this Python module (imported on demand by torch)
  m.set_python_module("mae_fast.ops.masking");
  // noise (N, L) -> ids_keep (N, len_keep) int64, ids_restore (N, L) int64, mask (N, L) float32 (1 = removed)
  m.def("random_masking(Tensor noise, int len_keep) -> (Tensor ids_keep, Tensor ids_restore, Tensor mask)");
}

TORCH_LIBRARY_IMPL(mae_fast, CPU, m) { m.impl("random_masking", &mae_fast::masking::random_masking_cpu); }

#ifdef MAE_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mae_fast, CUDA, m) { m.impl("random_masking", &mae_fast::masking::random_masking_cuda); }
#endif
