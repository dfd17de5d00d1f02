// Picks the instruction-set build of the engine's dot-product loops (matmul_kernels.h).
#include "cachemgr/util/cpu_features.h"
#include "tools/engine/matmul_kernels.h"

namespace cachemgr::engine {

// Defined by the builds of matmul_kernels.cc.
extern const MatMulKernels kBaselineMatMulKernels;
#ifdef CACHEMGR_HAVE_AVX2_FMA_KERNELS
extern const MatMulKernels kAvx2FmaMatMulKernels;
#endif

const MatMulKernels& BaselineMatMulKernels() { return kBaselineMatMulKernels; }

const MatMulKernels* Avx2FmaMatMulKernels() {
#ifdef CACHEMGR_HAVE_AVX2_FMA_KERNELS
  static const bool supported = CpuSupportsAvx2Fma();
  return supported ? &kAvx2FmaMatMulKernels : nullptr;
#else
  return nullptr;
#endif
}

const MatMulKernels& SelectedMatMulKernels() {
  static const MatMulKernels* const selected = [] {
    const MatMulKernels* avx2 = Avx2FmaMatMulKernels();
    return avx2 != nullptr ? avx2 : &BaselineMatMulKernels();
  }();
  return *selected;
}

}  // namespace cachemgr::engine
