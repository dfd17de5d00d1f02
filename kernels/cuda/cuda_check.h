// cudaError_t -> absl::Status plumbing for the CUDA launchers.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace cachemgr::kernels {

// INTERNAL status "file:line: expr: cudaErrorName: description"; OK for cudaSuccess.
inline absl::Status CudaErrorToStatus(cudaError_t err, const char* expr, const char* file,
                                      int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", expr, ": ", cudaGetErrorName(err),
                                          ": ", cudaGetErrorString(err)));
}

}  // namespace cachemgr::kernels

// Evaluates `expr` (a cudaError_t) and returns an INTERNAL absl::Status from the enclosing
// function if it is not cudaSuccess.
#define CACHEMGR_CUDA_RETURN_IF_ERROR(expr)                                              \
  do {                                                                                   \
    const cudaError_t cachemgr_cuda_err_ = (expr);                                       \
    if (cachemgr_cuda_err_ != cudaSuccess) {                                             \
      return ::cachemgr::kernels::CudaErrorToStatus(cachemgr_cuda_err_, #expr, __FILE__, \
                                                    __LINE__);                           \
    }                                                                                    \
  } while (false)
