// torch.ops.mae_fast.unshuffle_scatter and its backward: the decoder input of MAE in one pass
// each way, with the official semantics (mae_fast/reference.py::unshuffle). Schemas, argument
// checks, the CPU implementation, and the CUDA entry points (kernels in cuda/unshuffle_kernels.cu).
// The index arithmetic shared with the CUDA kernels is in unshuffle_index.h.
#include <Python.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "unshuffle_cuda.h"
#include "unshuffle_index.h"

#ifdef MAE_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// `import mae_fast._C` registers the ops below; the module itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace mae_fast {
namespace unshuffle {
namespace {

using at::Tensor;

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_same_device(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "mae_fast.unshuffle_scatter: ", name, " is on ", t.device(),
              " but the other inputs are on ", ref.device());
}

void check_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "mae_fast.unshuffle_scatter: ", name,
              " must be contiguous (call .contiguous()); got strides ", t.strides(), " for shape ", t.sizes());
}

void check_ids_shape(const Tensor& ids_restore, int64_t N) {
  TORCH_CHECK(ids_restore.dim() == 2 && ids_restore.size(0) == N,
              "mae_fast.unshuffle_scatter: ids_restore must be (N, L) with N = ", N, ", got shape ",
              ids_restore.sizes());
  TORCH_CHECK(ids_restore.scalar_type() == at::kLong, "mae_fast.unshuffle_scatter: ids_restore must be int64, got ",
              ids_restore.scalar_type());
}

void check_len_decode(const char* op, int64_t len_decode, int64_t K, int64_t L) {
  TORCH_CHECK(len_decode >= -1 && K + len_decode <= L, op, ": len_decode = ", len_decode,
              " must be -1 (official layout) or in [0, L - K = ", L - K, "]");
}

Dims check_forward_args(const Tensor& x, const Tensor& mask_token, const Tensor& ids_restore,
                        const std::optional<Tensor>& pos_embed, int64_t len_decode) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) >= 1, "mae_fast.unshuffle_scatter: x must be (N, 1+K, D), got shape ",
              x.sizes());
  const int64_t N = x.size(0), K = x.size(1) - 1, D = x.size(2);
  check_ids_shape(ids_restore, N);
  const int64_t L = ids_restore.size(1);
  TORCH_CHECK(K <= L, "mae_fast.unshuffle_scatter: x has 1+K = ", 1 + K, " rows but ids_restore has only L = ", L,
              " positions (need K <= L)");
  TORCH_CHECK(mask_token.dim() == 3 && mask_token.size(0) == 1 && mask_token.size(1) == 1 && mask_token.size(2) == D,
              "mae_fast.unshuffle_scatter: mask_token must be (1, 1, D) with D = ", D, ", got shape ",
              mask_token.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()),
              "mae_fast.unshuffle_scatter: x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(mask_token.scalar_type() == x.scalar_type(), "mae_fast.unshuffle_scatter: mask_token dtype ",
              mask_token.scalar_type(), " differs from x dtype ", x.scalar_type());
  check_same_device(mask_token, x, "mask_token");
  check_same_device(ids_restore, x, "ids_restore");
  check_contiguous(x, "x");
  check_contiguous(mask_token, "mask_token");
  check_contiguous(ids_restore, "ids_restore");
  if (pos_embed.has_value()) {
    const Tensor& pos = *pos_embed;
    TORCH_CHECK(pos.dim() == 3 && pos.size(0) == 1 && pos.size(1) == 1 + L && pos.size(2) == D,
                "mae_fast.unshuffle_scatter: pos_embed must be (1, 1+L, D) = (1, ", 1 + L, ", ", D, "), got shape ",
                pos.sizes());
    TORCH_CHECK(pos.scalar_type() == x.scalar_type(), "mae_fast.unshuffle_scatter: pos_embed dtype ",
                pos.scalar_type(), " differs from x dtype ", x.scalar_type());
    check_same_device(pos, x, "pos_embed");
    check_contiguous(pos, "pos_embed");
  }
  check_len_decode("mae_fast.unshuffle_scatter", len_decode, K, L);
  return Dims{N, L, K, D, len_decode};
}

Dims check_backward_args(const Tensor& grad_out, const Tensor& ids_restore, int64_t len_keep, int64_t len_decode) {
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(1) >= 1,
              "mae_fast.unshuffle_scatter_backward: grad_out must be (N, 1+L, D), got shape ", grad_out.sizes());
  const int64_t N = grad_out.size(0), D = grad_out.size(2);
  check_ids_shape(ids_restore, N);
  const int64_t L = ids_restore.size(1);
  TORCH_CHECK(len_keep >= 0 && len_keep <= L, "mae_fast.unshuffle_scatter_backward: len_keep = ", len_keep,
              " must be in [0, L = ", L, "]");
  check_len_decode("mae_fast.unshuffle_scatter_backward", len_decode, len_keep, L);
  const Dims dims{N, L, len_keep, D, len_decode};
  TORCH_CHECK(grad_out.size(1) == 1 + out_rows(dims), "mae_fast.unshuffle_scatter_backward: grad_out has ",
              grad_out.size(1), " rows, expected ", len_decode < 0 ? "1+L = " : "1+len_keep+len_decode = ",
              1 + out_rows(dims));
  TORCH_CHECK(is_supported_float(grad_out.scalar_type()),
              "mae_fast.unshuffle_scatter_backward: grad_out must be float32, float64, float16 or bfloat16, got ",
              grad_out.scalar_type());
  check_same_device(ids_restore, grad_out, "ids_restore");
  check_contiguous(grad_out, "grad_out");
  check_contiguous(ids_restore, "ids_restore");
  return dims;
}

// Every row of ids_restore must be a permutation of 0..L-1 (what argsort returns): in range, so no
// read leaves x, and no repeats, so the backward's scatter writes each grad_x row exactly once.
void check_ids_permutation_cpu(const Tensor& ids_restore, int64_t N, int64_t L) {
  const int64_t* ids = ids_restore.data_ptr<int64_t>();
  std::vector<char> seen(static_cast<size_t>(L));
  for (int64_t n = 0; n < N; ++n) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t r = ids[n * L + l];
      TORCH_CHECK(r >= 0 && r < L, "mae_fast.unshuffle_scatter: ids_restore[", n, ", ", l, "] = ", r,
                  " is out of range [0, L = ", L, ")");
      TORCH_CHECK(!seen[r], "mae_fast.unshuffle_scatter: ids_restore[", n, "] is not a permutation of 0..L-1 (",
                  r, " appears twice)");
      seen[r] = 1;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// CPU
// ---------------------------------------------------------------------------------------------

Tensor forward_cpu(const Tensor& x, const Tensor& mask_token, const Tensor& ids_restore,
                   const std::optional<Tensor>& pos_embed, int64_t len_decode) {
  TORCH_CHECK(x.device().is_cpu(), "mae_fast.unshuffle_scatter (CPU kernel): x is on ", x.device());
  const Dims dims = check_forward_args(x, mask_token, ids_restore, pos_embed, len_decode);
  check_ids_permutation_cpu(ids_restore, dims.N, dims.L);
  Tensor out = at::empty({dims.N, 1 + out_rows(dims), dims.D}, x.options());
  const int64_t rows = dims.N * (1 + dims.L);  // source slots: cls + every patch
  if (out.numel() == 0) return out;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, dims.D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unshuffle_scatter_cpu", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* mask_ptr = mask_token.const_data_ptr<scalar_t>();
    const int64_t* ids = ids_restore.const_data_ptr<int64_t>();
    const scalar_t* pos_ptr = pos_embed.has_value() ? pos_embed->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / (1 + dims.L), t = row % (1 + dims.L);
        const int64_t r = dest_row(dims, ids, n, t);
        if (r < 0) continue;  // dropped by decoder-side masking
        const int64_t s = source_row(dims, ids, n, t);
        const scalar_t* src = s >= 0 ? x_ptr + x_offset(dims, n, s) : mask_ptr;
        scalar_t* dst = out_ptr + out_offset(dims, n, r);
        if (pos_ptr != nullptr) {
          const scalar_t* pos = pos_ptr + pos_offset(dims, t);
          for (int64_t d = 0; d < dims.D; ++d) dst[d] = add_pos(src[d], pos[d]);
        } else {
          std::memcpy(dst, src, sizeof(scalar_t) * dims.D);
        }
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> backward_cpu(const Tensor& grad_out, const Tensor& ids_restore, int64_t len_keep,
                                        int64_t len_decode) {
  TORCH_CHECK(grad_out.device().is_cpu(), "mae_fast.unshuffle_scatter_backward (CPU kernel): grad_out is on ",
              grad_out.device());
  const Dims dims = check_backward_args(grad_out, ids_restore, len_keep, len_decode);
  check_ids_permutation_cpu(ids_restore, dims.N, dims.L);
  Tensor grad_x = at::empty({dims.N, 1 + dims.K, dims.D}, grad_out.options());
  Tensor grad_mask_token = at::empty({1, 1, dims.D}, grad_out.options());
  const int64_t chunks = num_chunks(dims);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "unshuffle_scatter_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    const int64_t* ids = ids_restore.const_data_ptr<int64_t>();
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    std::vector<acc_t> partial(static_cast<size_t>(dims.N * chunks * dims.D));
    // pass 1: per (sample, chunk), in row order: kept rows to grad_x, removed rows summed
    at::parallel_for(0, dims.N * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / chunks, c = item % chunks;
        if (c == 0) std::memcpy(gx + x_offset(dims, n, 0), go + out_offset(dims, n, 0), sizeof(scalar_t) * dims.D);
        acc_t* acc = partial.data() + partial_offset(dims, n, c);
        std::fill(acc, acc + dims.D, acc_t(0));
        for (int64_t t = chunk_first_row(dims, c); t < chunk_last_row(dims, c); ++t) {
          const int64_t r = dest_row(dims, ids, n, t);
          if (r < 0) continue;  // dropped by decoder-side masking: no gradient
          const scalar_t* g = go + out_offset(dims, n, r);
          const int64_t s = source_row(dims, ids, n, t);
          if (s >= 0) {
            std::memcpy(gx + x_offset(dims, n, s), g, sizeof(scalar_t) * dims.D);
          } else {
            for (int64_t d = 0; d < dims.D; ++d) acc[d] += static_cast<acc_t>(g[d]);
          }
        }
      }
    });
    // pass 2: every column sums its N * chunks partials in one fixed order
    scalar_t* gm = grad_mask_token.mutable_data_ptr<scalar_t>();
    const int64_t partial_rows = dims.N * chunks;
    at::parallel_for(0, dims.D, 256, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(static_cast<size_t>(end - begin), acc_t(0));
      for (int64_t r = 0; r < partial_rows; ++r) {
        const acc_t* p = partial.data() + r * dims.D;
        for (int64_t d = begin; d < end; ++d) sum[d - begin] += p[d];
      }
      for (int64_t d = begin; d < end; ++d) gm[d] = static_cast<scalar_t>(sum[d - begin]);
    });
  });
  return {grad_x, grad_mask_token};
}

// ---------------------------------------------------------------------------------------------
// CUDA (kernels in cuda/unshuffle_kernels.cu)
// ---------------------------------------------------------------------------------------------
#ifdef MAE_FAST_WITH_CUDA

// On CUDA the index check costs a device sync, so it runs only with MAE_FAST_DEBUG=1. Without it
// an out-of-range index reads as a mask token (never outside x; see source_row), and a repeated
// index leaves the backward's grad_x rows undefined.
bool debug_checks_enabled() {
  const char* v = std::getenv("MAE_FAST_DEBUG");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

void check_ids_permutation_cuda(const Tensor& ids_restore, int64_t L) {
  if (ids_restore.numel() == 0) return;
  TORCH_CHECK(ids_restore.min().item<int64_t>() >= 0 && ids_restore.max().item<int64_t>() < L,
              "mae_fast.unshuffle_scatter: ids_restore has values outside [0, L = ", L, ") (MAE_FAST_DEBUG check)");
  const Tensor sorted = std::get<0>(ids_restore.sort(1));
  const Tensor expected = at::arange(L, ids_restore.options()).expand_as(sorted);
  TORCH_CHECK(sorted.equal(expected),
              "mae_fast.unshuffle_scatter: a row of ids_restore is not a permutation of 0..L-1 (MAE_FAST_DEBUG check)");
}

Tensor forward_cuda(const Tensor& x, const Tensor& mask_token, const Tensor& ids_restore,
                    const std::optional<Tensor>& pos_embed, int64_t len_decode) {
  TORCH_CHECK(x.device().is_cuda(), "mae_fast.unshuffle_scatter (CUDA kernel): x is on ", x.device());
  const Dims dims = check_forward_args(x, mask_token, ids_restore, pos_embed, len_decode);
  const c10::cuda::CUDAGuard guard(x.device());
  if (debug_checks_enabled()) check_ids_permutation_cuda(ids_restore, dims.L);
  Tensor out = at::empty({dims.N, 1 + out_rows(dims), dims.D}, x.options());
  if (out.numel() == 0) return out;
  launch_forward(x.scalar_type(), x.const_data_ptr(), mask_token.const_data_ptr(), ids_restore.const_data_ptr<int64_t>(),
                 pos_embed.has_value() ? pos_embed->const_data_ptr() : nullptr, out.mutable_data_ptr(), dims,
                 c10::cuda::getCurrentCUDAStream());
  return out;
}

std::tuple<Tensor, Tensor> backward_cuda(const Tensor& grad_out, const Tensor& ids_restore, int64_t len_keep,
                                         int64_t len_decode) {
  TORCH_CHECK(grad_out.device().is_cuda(), "mae_fast.unshuffle_scatter_backward (CUDA kernel): grad_out is on ",
              grad_out.device());
  const Dims dims = check_backward_args(grad_out, ids_restore, len_keep, len_decode);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  if (debug_checks_enabled()) check_ids_permutation_cuda(ids_restore, dims.L);
  Tensor grad_x = at::empty({dims.N, 1 + dims.K, dims.D}, grad_out.options());
  Tensor grad_mask_token = at::empty({1, 1, dims.D}, grad_out.options());
  const at::ScalarType acc_type = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor partial = at::empty({dims.N, num_chunks(dims), dims.D}, grad_out.options().dtype(acc_type));
  launch_backward(grad_out.scalar_type(), grad_out.const_data_ptr(), ids_restore.const_data_ptr<int64_t>(),
                  grad_x.mutable_data_ptr(), partial.mutable_data_ptr(), grad_mask_token.mutable_data_ptr(), dims,
                  c10::cuda::getCurrentCUDAStream());
  return {grad_x, grad_mask_token};
}

#endif  // MAE_FAST_WITH_CUDA

bool built_with_cuda() {
#ifdef MAE_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace unshuffle
}  // namespace mae_fast

TORCH_LIBRARY(mae_fast, m) {
  // register_fake / register_autograd live in this Python module (imported on demand by torch)
  m.set_python_module("mae_fast.ops.unshuffle");
  // x (N, 1+K, D), mask_token (1, 1, D), ids_restore (N, L) int64, pos_embed (1, 1+L, D) -> (N, 1+L, D);
  // len_decode = M >= 0 (decoder-side masking): -> (N, 1+K+M, D) in decoder order (unshuffle_index.h)
  m.def("unshuffle_scatter(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed=None, "
        "int len_decode=-1) -> Tensor");
  // grad_out (N, 1+L, D) or (N, 1+len_keep+len_decode, D) -> grad_x (N, 1+len_keep, D), grad_mask_token (1, 1, D)
  m.def("unshuffle_scatter_backward(Tensor grad_out, Tensor ids_restore, int len_keep, int len_decode=-1) "
        "-> (Tensor, Tensor)");
  m.def("_built_with_cuda() -> bool", &mae_fast::unshuffle::built_with_cuda);
}

TORCH_LIBRARY_IMPL(mae_fast, CPU, m) {
  m.impl("unshuffle_scatter", &mae_fast::unshuffle::forward_cpu);
  m.impl("unshuffle_scatter_backward", &mae_fast::unshuffle::backward_cpu);
}

#ifdef MAE_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mae_fast, CUDA, m) {
  m.impl("unshuffle_scatter", &mae_fast::unshuffle::forward_cuda);
  m.impl("unshuffle_scatter_backward", &mae_fast::unshuffle::backward_cuda);
}
#endif
