// CPU dropout in one pass (module `_dropout`; common/dropout.py).
//
// PyTorch's CPU dropout draws one random float per element; inside BERT's
// attention ([B, heads, L, L]) that was a fifth of a small-model step. Here one SplitMix64 output gives the random
// bytes of eight elements: element i is kept when byte i % 8 of output i / 8
// is >= threshold (p = threshold / 256), kept values are multiplied by scale.
//   forward(x, threshold, scale, seed) -> (y, keep)   keep: bool, 1 byte each
// The backward, where(keep, grad * scale, 0), stays in common/dropout.py:
// torch ops there are as fast and run under vmap (the batched per-task
// backward of common/gradagg.py), which an extension call cannot.
// Output w of the stream is mix(seed + (w + 1) * 0x9E3779B97F4A7C15): the
// SplitMix64 generator seeded with `seed`, counter-based, so the mask does not
// depend on the thread count. common/dropout.py computes the same stream with
// torch integer ops where this module is not built (bit-identical masks).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr int64_t kGrainWords = 2048;  // 16384 elements per task of parallel_for

inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void check_threshold(int64_t threshold) {
  TORCH_CHECK(threshold >= 1 && threshold <= 255, "dropout: threshold must be in [1, 255] (p = threshold / 256), got ",
              threshold);
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, int64_t threshold, double scale, int64_t seed) {
  TORCH_CHECK(input.device().is_cpu(), "dropout: a CPU tensor is expected");
  check_threshold(threshold);
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor keep = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const int64_t n = x.numel();
  const uint64_t base = static_cast<uint64_t>(seed);
  const auto t = static_cast<uint8_t>(threshold);
  bool* pk = keep.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    const auto s = static_cast<opmath_t>(scale);
    at::parallel_for(0, (n + 7) / 8, kGrainWords, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        uint64_t r = mix(base + static_cast<uint64_t>(w + 1) * kGolden);
        const int64_t end = std::min(n, 8 * w + 8);
        for (int64_t i = 8 * w; i < end; ++i, r >>= 8) {
          const bool k = static_cast<uint8_t>(r & 0xFF) >= t;
          pk[i] = k;
          py[i] = k ? static_cast<scalar_t>(static_cast<opmath_t>(px[i]) * s) : scalar_t(0);
        }
      }
    });
  });
  return {y, keep};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Dropout in one pass on CPU: SplitMix64 random bytes, a bool keep mask (common/dropout.py)";
  m.def("forward", &forward, "(y, keep) = dropout of x: keep where the random byte >= threshold, y = x * keep * scale",
        py::arg("x"), py::arg("threshold"), py::arg("scale"), py::arg("seed"), py::call_guard<py::gil_scoped_release>());
}
