// Every instruction-set build of the engine's dot-product loops (matmul_kernels.h) against a
// double reference, over shapes that reach every tail of the blocked loops, and MatMul on a
// thread pool against the same reference. Run under the sanitizer builds
// (scripts/sanitize.sh), this checks the code the per-function target_clones used to build.
#include "tools/engine/matmul_kernels.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cachemgr/util/cpu_features.h"
#include "tools/engine/ops.h"
#include "tools/engine/thread_pool.h"

namespace cachemgr::engine {
namespace {

std::vector<const MatMulKernels*> AllBuilds() {
  std::vector<const MatMulKernels*> builds = {&BaselineMatMulKernels()};
  if (const MatMulKernels* avx2 = Avx2FmaMatMulKernels(); avx2 != nullptr) builds.push_back(avx2);
  return builds;
}

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> out(n);
  for (float& x : out) x = normal(rng);
  return out;
}

// |got - sum a[i] b[i]| within float rounding of the terms' magnitudes.
void CheckDot(float got, const float* a, const float* b, size_t n) {
  double want = 0.0, magnitude = 0.0;
  for (size_t i = 0; i < n; ++i) {
    want += double{a[i]} * b[i];
    magnitude += std::abs(double{a[i]} * b[i]);
  }
  CHECK(std::abs(got - want) <= 1e-6 * (magnitude + 1.0));
}

TEST_CASE("the AVX2 build of the matmul loops runs exactly where the CPU has AVX2 and FMA",
          "[cpu]") {
#if defined(__x86_64__)
  CHECK((Avx2FmaMatMulKernels() != nullptr) == CpuSupportsAvx2Fma());
#endif
  const std::string selected = SelectedMatMulKernels().name;
  CHECK(selected == (Avx2FmaMatMulKernels() != nullptr ? "avx2_fma" : "baseline"));
}

TEST_CASE("dot: every build, every tail of the 16- and 8-wide loops", "[cpu]") {
  const std::vector<float> a = Random(100, 1), b = Random(100, 2);
  for (const MatMulKernels* build : AllBuilds()) {
    for (const size_t n : {0u, 1u, 7u, 8u, 9u, 15u, 16u, 17u, 24u, 100u}) {
      CAPTURE(build->name, n);
      CheckDot(build->dot(a.data(), b.data(), n), a.data(), b.data(), n);
    }
  }
}

TEST_CASE("matmul_rows: every build writes exactly rows x [o0, o1) of y", "[cpu]") {
  for (const MatMulKernels* build : AllBuilds()) {
    for (const size_t rows : {1u, 3u, 4u, 5u, 9u}) {
      for (const size_t in : {1u, 7u, 8u, 17u, 64u}) {
        for (const size_t out : {1u, 2u, 3u, 7u}) {
          const std::vector<float> x = Random(rows * in, 3), w = Random(out * in, 4);
          for (size_t o0 = 0; o0 < out; ++o0) {
            for (const size_t o1 : {o0 + 1, out}) {
              CAPTURE(build->name, rows, in, out, o0, o1);
              std::vector<float> y(rows * out, std::numeric_limits<float>::quiet_NaN());
              build->matmul_rows(x.data(), rows, in, w.data(), o0, o1, out, y.data());
              for (size_t t = 0; t < rows; ++t) {
                for (size_t o = 0; o < out; ++o) {
                  if (o < o0 || o >= o1) {
                    CHECK(std::isnan(y[t * out + o]));
                  } else {
                    CheckDot(y[t * out + o], &x[t * in], &w[o * in], in);
                  }
                }
              }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("MatMul on two threads matches the reference", "[cpu]") {
  ThreadPool pool(2);
  const size_t rows = 6, in = 72, out = 33;
  const std::vector<float> x = Random(rows * in, 5), w = Random(out * in, 6);
  std::vector<float> y(rows * out, std::numeric_limits<float>::quiet_NaN());
  MatMul(pool, x.data(), rows, in, w.data(), out, y.data());
  for (size_t t = 0; t < rows; ++t) {
    for (size_t o = 0; o < out; ++o) {
      CAPTURE(t, o);
      CheckDot(y[t * out + o], &x[t * in], &w[o * in], in);
    }
  }
  CheckDot(Dot(x.data(), w.data(), in), x.data(), w.data(), in);
}

}  // namespace
}  // namespace cachemgr::engine
