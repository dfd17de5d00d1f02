// Picks the instruction-set build of the compression kernels (vector_kernels.h).
#include "cachemgr/compress/vector_kernels.h"
#include "cachemgr/util/cpu_features.h"

namespace cachemgr::compress {

// Defined by the builds of vector_kernels.cc.
extern const VectorKernels kBaselineVectorKernels;
#ifdef CACHEMGR_HAVE_AVX2_FMA_KERNELS
extern const VectorKernels kAvx2FmaVectorKernels;
#endif

const VectorKernels& BaselineVectorKernels() { return kBaselineVectorKernels; }

const VectorKernels* Avx2FmaVectorKernels() {
#ifdef CACHEMGR_HAVE_AVX2_FMA_KERNELS
  static const bool supported = CpuSupportsAvx2Fma();
  return supported ? &kAvx2FmaVectorKernels : nullptr;
#else
  return nullptr;
#endif
}

const VectorKernels& SelectedVectorKernels() {
  static const VectorKernels* const selected = [] {
    const VectorKernels* avx2 = Avx2FmaVectorKernels();
    return avx2 != nullptr ? avx2 : &BaselineVectorKernels();
  }();
  return *selected;
}

}  // namespace cachemgr::compress
