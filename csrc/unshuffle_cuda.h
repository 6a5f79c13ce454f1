// Launchers of the CUDA kernels (csrc/cuda/unshuffle_kernels.cu). They take raw pointers so the
// .cu file needs no ATen tensor headers (nvcc compiles it fast); csrc/unshuffle.cpp checks the
// tensors and calls them on the current stream.
#pragma once

#ifdef MAE_FAST_WITH_CUDA
#include <cuda_runtime_api.h>

#include <c10/core/ScalarType.h>

#include "unshuffle_index.h"

namespace mae_fast {
namespace unshuffle {

// out = unshuffle-scatter of x / mask_token by ids_restore (+ pos_embed when not null).
void launch_forward(c10::ScalarType dtype, const void* x, const void* mask_token,
                    const int64_t* ids_restore, const void* pos_embed, void* out, const Dims& dims,
                    cudaStream_t stream);

// grad_x, and the per-(sample, chunk) mask-token partial sums `partial` (N, chunks, D) in the
// op-math type (float; double for double), then their fixed-order sum into grad_mask_token (D).
void launch_backward(c10::ScalarType dtype, const void* grad_out, const int64_t* ids_restore,
                     void* grad_x, void* partial, void* grad_mask_token, const Dims& dims,
                     cudaStream_t stream);

}  // namespace unshuffle
}  // namespace mae_fast
#endif  // MAE_FAST_WITH_CUDA
