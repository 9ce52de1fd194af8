// Torch glue of the CUDA path (module `_gradagg_cuda`), compiled only with a
// CUDA build of torch: checks the tensors, takes torch's current stream and
// allocates the workspace from torch's caching allocator, then calls the
// launch functions of gradagg_cuda.cu. Same semantics as gradagg_cpu.cpp.

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "gradagg_cuda.h"

namespace {

void check_buffer(const at::Tensor& buf, const char* fn) {
  TORCH_CHECK(buf.dim() == 2, fn, ": gradient buffer must be 2-D [T, P], got shape ", buf.sizes());
  TORCH_CHECK(buf.scalar_type() == at::kFloat, fn, ": gradient buffer must be float32, got ",
              buf.scalar_type());
  TORCH_CHECK(buf.is_cuda(), fn, ": gradient buffer must be on a CUDA device, got ", buf.device());
  TORCH_CHECK(buf.size(1) <= 1 || buf.stride(1) == 1, fn,
              ": gradient buffer rows must be contiguous (stride(1) == 1), got strides ", buf.strides());
  TORCH_CHECK(buf.size(0) <= 1 || buf.stride(0) >= buf.size(1), fn,
              ": gradient buffer rows overlap (stride(0) < P)");
}

at::Tensor gram(const at::Tensor& buf) {
  check_buffer(buf, "gradagg.gram");
  const c10::cuda::CUDAGuard guard(buf.device());
  const int64_t T = buf.size(0);
  const int64_t P = buf.size(1);
  const int64_t ld = T > 1 ? buf.stride(0) : P;
  auto out = at::zeros({T, T}, buf.options().dtype(at::kDouble));
  if (T == 0) return out;
  const int device = buf.get_device();
  const int64_t ws = gradagg::gram_cuda_workspace(T, P, device);
  auto work = at::empty({ws}, buf.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(gradagg::gram_cuda(buf.data_ptr<float>(), T, P, ld, out.data_ptr<double>(),
                                    work.data_ptr<double>(), ws, device, stream));
  return out;
}

at::Tensor combine(const at::Tensor& buf, const at::Tensor& coeffs, at::Tensor out) {
  check_buffer(buf, "gradagg.combine");
  const int64_t T = buf.size(0);
  const int64_t P = buf.size(1);
  const int64_t ld = T > 1 ? buf.stride(0) : P;
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.numel() == T, "gradagg.combine: coeffs must have shape [",
              T, "], got ", coeffs.sizes());
  TORCH_CHECK(out.dim() == 1 && out.numel() == P, "gradagg.combine: out must have shape [", P,
              "], got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.device() == buf.device() && out.is_contiguous(),
              "gradagg.combine: out must be a contiguous float32 tensor on ", buf.device());
  const c10::cuda::CUDAGuard guard(buf.device());
  // The T coefficients travel by value in the kernel arguments (a device
  // tensor here is copied back once, which waits for the stream).
  auto c = coeffs.detach().to(at::kCPU, at::kDouble).contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(gradagg::combine_cuda(buf.data_ptr<float>(), T, P, ld, c.data_ptr<double>(),
                                       out.data_ptr<float>(), stream));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Per-task gradient Gram matrix and combination (CUDA)";
  m.def("gram", &gram, "Gram matrix [T, T] (float64) of the rows of a float32 [T, P] buffer",
        py::arg("buf"), py::call_guard<py::gil_scoped_release>());
  m.def("combine", &combine, "out[p] = sum_t coeffs[t] * buf[t, p], written into out",
        py::arg("buf"), py::arg("coeffs"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
}
