// Shared by the GPU parity tests: device detection, an owning device buffer, copies.
#pragma once

#include <cuda_runtime.h>

#include <catch2/catch.hpp>
#include <cstddef>
#include <cstdio>
#include <random>
#include <vector>

namespace cachemgr::kernels::testing {

// False (and says so) when there is no usable CUDA device: the parity cases then check nothing.
inline bool HaveCudaDevice() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // Clear the error so it does not leak into later calls.
    std::printf("no CUDA device: GPU parity not checked\n");
    return false;
  }
  return true;
}

// Owns `bytes` of device memory, filled with 0xAB (poison) so untouched outputs show.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    REQUIRE(cudaMalloc(&ptr_, bytes == 0 ? 1 : bytes) == cudaSuccess);
    REQUIRE(cudaMemset(ptr_, 0xAB, bytes == 0 ? 1 : bytes) == cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  std::byte* get() const { return static_cast<std::byte*>(ptr_); }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

inline void ToDevice(void* dst, const void* src, size_t bytes) {
  REQUIRE(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice) == cudaSuccess);
}

template <typename T>
void ToDevice(const DeviceBuffer& dst, const std::vector<T>& src) {
  REQUIRE(dst.bytes() >= src.size() * sizeof(T));
  ToDevice(dst.get(), src.data(), src.size() * sizeof(T));
}

inline std::vector<std::byte> FromDevice(const std::byte* src, size_t bytes) {
  std::vector<std::byte> out(bytes);
  REQUIRE(cudaMemcpy(out.data(), src, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
  return out;
}

template <typename T>
std::vector<T> FromDevice(const DeviceBuffer& src, size_t count) {
  std::vector<T> out(count);
  REQUIRE(cudaMemcpy(out.data(), src.get(), count * sizeof(T), cudaMemcpyDeviceToHost) ==
          cudaSuccess);
  return out;
}

inline void FillRandom(std::vector<std::byte>& v, std::mt19937& rng) {
  for (auto& b : v) b = static_cast<std::byte>(rng() & 0xFF);
}

}  // namespace cachemgr::kernels::testing
