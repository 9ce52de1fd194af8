// CPU path of the fused per-task gradient aggregation (module `_gradagg`).
//
// Layout: the T per-task gradients of the shared parameters live in one
// fp32 buffer [T, P] whose rows may be padded (stride(0) >= P, stride(1) == 1),
// row t = task t's flattened gradient. Both routines read the buffer in place:
//   gram(buf)              -> [T, T] float64, one pass over the T x P values
//   combine(buf, c, out)   -> out[p] = sum_t c[t] * buf[t, p], one pass
// PCGrad, GradNorm, MGDA, CAGrad, ... only need these two (see common/gradagg.py).
//
// Accuracy: each column block (a few thousand values, kept in L1) is summed in
// fp32 by 32 independent lanes (about 50 products per lane), the block sums are
// added in fp64. The error stays near fp32 rounding of a single block
// (~1e-7 relative) however large P is, unlike one fp32 sum over all of P.
//
// Parallel over P with OpenMP, threads = torch.get_num_threads(); results are
// bit-identical whatever the thread count (fixed summation order).

// ATen + torch's pybind11 casters only: half the compile time of torch/extension.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kLanes = 32;   // independent fp32 partial sums per dot product
constexpr int64_t kGroups = 64;  // fp64 partial Gram matrices (see gram)

// Columns per block: T rows of a block should fit in L1 (32 KiB), so every
// pair (i, j) re-reads the block from cache, not from memory.
int64_t block_columns(int64_t T) {
  int64_t b = 8192 / std::max<int64_t>(T, 1);
  b = std::max<int64_t>(256, std::min<int64_t>(b, 4096));
  return b / kLanes * kLanes;
}

// Dot product of one cache-resident block: kLanes independent fp32 chains
// (vectorised by the compiler without -ffast-math), summed in fp64.
inline double dot_block(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[k + l] * b[k + l];
  }
  double s = 0.0;
  for (; k < n; ++k) s += static_cast<double>(a[k]) * static_cast<double>(b[k]);
  for (int64_t l = 0; l < kLanes; ++l) s += static_cast<double>(acc[l]);
  return s;
}

// Two dot products sharing the left operand: a.b and a.c (3 loads per 2 FMAs
// instead of 4, the loop is bound by L1 loads).
inline void dot_block2(const float* __restrict__ a, const float* __restrict__ b,
                       const float* __restrict__ c, int64_t n, double& sb, double& sc) {
  float ab[kLanes] = {0.f};
  float ac[kLanes] = {0.f};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float x = a[k + l];
      ab[l] += x * b[k + l];
      ac[l] += x * c[k + l];
    }
  }
  double s1 = 0.0, s2 = 0.0;
  for (; k < n; ++k) {
    s1 += static_cast<double>(a[k]) * static_cast<double>(b[k]);
    s2 += static_cast<double>(a[k]) * static_cast<double>(c[k]);
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    s1 += static_cast<double>(ab[l]);
    s2 += static_cast<double>(ac[l]);
  }
  sb += s1;
  sc += s2;
}

void check_buffer(const at::Tensor& buf, const char* fn) {
  TORCH_CHECK(buf.dim() == 2, fn, ": gradient buffer must be 2-D [T, P], got shape ", buf.sizes());
  TORCH_CHECK(buf.scalar_type() == at::kFloat, fn, ": gradient buffer must be float32, got ",
              buf.scalar_type());
  TORCH_CHECK(buf.device().is_cpu(), fn, ": gradient buffer must be on the CPU, got ", buf.device());
  TORCH_CHECK(buf.size(1) <= 1 || buf.stride(1) == 1, fn,
              ": gradient buffer rows must be contiguous (stride(1) == 1), got strides ", buf.strides());
  TORCH_CHECK(buf.size(0) <= 1 || buf.stride(0) >= buf.size(1), fn,
              ": gradient buffer rows overlap (stride(0) < P)");
}

int num_threads() { return std::max(1, at::get_num_threads()); }

at::Tensor gram(const at::Tensor& buf) {
  check_buffer(buf, "gradagg.gram");
  const int64_t T = buf.size(0);
  const int64_t P = buf.size(1);
  const int64_t ld = T > 1 ? buf.stride(0) : P;
  auto out = at::zeros({T, T}, buf.options().dtype(at::kDouble));
  if (T == 0 || P == 0) return out;

  const float* base = buf.data_ptr<float>();
  const int64_t B = block_columns(T);
  const int64_t nblocks = (P + B - 1) / B;
  // Blocks are split into a fixed number of contiguous groups, each with its
  // own fp64 upper triangle (padded to a cache line against false sharing),
  // summed in group order: the result does not depend on the thread count or
  // on which thread ran which group, and a stalled thread (busy machine) only
  // delays its current group (dynamic schedule).
  const int64_t ngroups = std::min<int64_t>(nblocks, kGroups);
  const int64_t slot = (T * T + 7) / 8 * 8;
  std::vector<double> partial(static_cast<size_t>(ngroups * slot), 0.0);
  const int nthreads = static_cast<int>(std::min<int64_t>(num_threads(), ngroups));

#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t grp = 0; grp < ngroups; ++grp) {
    double* acc = partial.data() + grp * slot;
    const int64_t first = grp * nblocks / ngroups, last = (grp + 1) * nblocks / ngroups;
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t start = blk * B;
      const int64_t n = std::min(B, P - start);
      for (int64_t i = 0; i < T; ++i) {
        const float* a = base + i * ld + start;
        int64_t j = i;
        for (; j + 1 < T; j += 2) {
          dot_block2(a, base + j * ld + start, base + (j + 1) * ld + start, n, acc[i * T + j],
                     acc[i * T + j + 1]);
        }
        if (j < T) acc[i * T + j] += dot_block(a, base + j * ld + start, n);
      }
    }
  }

  double* g = out.data_ptr<double>();
  for (int64_t grp = 0; grp < ngroups; ++grp) {
    const double* acc = partial.data() + grp * slot;
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = i; j < T; ++j) g[i * T + j] += acc[i * T + j];
  }
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < i; ++j) g[i * T + j] = g[j * T + i];
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
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.device().is_cpu() && out.is_contiguous(),
              "gradagg.combine: out must be a contiguous float32 CPU tensor");

  // Coefficients come as fp64 (from the Gram matrix); the products are fp32.
  auto c64 = coeffs.detach().to(at::kCPU, at::kDouble).contiguous();
  std::vector<float> c(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) c[t] = static_cast<float>(c64.data_ptr<double>()[t]);

  float* o = out.data_ptr<float>();
  if (P == 0) return out;
  if (T == 0) {
    out.zero_();
    return out;
  }
  const float* base = buf.data_ptr<float>();
  constexpr int64_t B = 2048;  // output block stays in L1 across the T rows
  const int64_t nblocks = (P + B - 1) / B;
  const int nthreads = static_cast<int>(std::min<int64_t>(num_threads(), nblocks));

#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t start = blk * B;
    const int64_t n = std::min(B, P - start);
    float* __restrict__ ob = o + start;
    const float* __restrict__ r0 = base + start;
    const float c0 = c[0];
    int64_t t = 1;
    if (T >= 2) {
      const float* __restrict__ r1 = base + ld + start;
      const float c1 = c[1];
      for (int64_t k = 0; k < n; ++k) ob[k] = c0 * r0[k] + c1 * r1[k];
      t = 2;
    } else {
      for (int64_t k = 0; k < n; ++k) ob[k] = c0 * r0[k];
    }
    for (; t + 1 < T; t += 2) {
      const float* __restrict__ ra = base + t * ld + start;
      const float* __restrict__ rb = base + (t + 1) * ld + start;
      const float ca = c[t], cb = c[t + 1];
      for (int64_t k = 0; k < n; ++k) ob[k] += ca * ra[k] + cb * rb[k];
    }
    if (t < T) {
      const float* __restrict__ ra = base + t * ld + start;
      const float ca = c[t];
      for (int64_t k = 0; k < n; ++k) ob[k] += ca * ra[k];
    }
  }
  return out;
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Per-task gradient Gram matrix and combination (CPU, OpenMP over P)";
  m.def("gram", &gram, "Gram matrix [T, T] (float64) of the rows of a float32 [T, P] buffer",
        py::arg("buf"), py::call_guard<py::gil_scoped_release>());
  m.def("combine", &combine, "out[p] = sum_t coeffs[t] * buf[t, p], written into out",
        py::arg("buf"), py::arg("coeffs"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.attr("openmp") = built_with_openmp();
}
