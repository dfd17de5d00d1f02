#include "cachemgr/backend/cuda_backend.h"

#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "cachemgr/backend/cuda_driver.h"
#include "cachemgr/backend/kv_store_digest.h"
#include "cachemgr/compress/codebook_graph.h"
#include "cachemgr/compress/selection.h"
#include "cachemgr/kernels/kv_digest.h"
#include "cachemgr/util/checked_math.h"
#include "cachemgr/util/status_macros.h"
#include "cachemgr/util/unique_fd.h"
#include "kernels/cpu/block_copy.h"
#include "kernels/cpu/token_rows.h"
#include "kernels/cuda/attention_scores.h"
#include "kernels/cuda/block_copy.h"
#include "kernels/cuda/codebook_graph.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/rank_topk.h"
#include "kernels/cuda/rope_rows.h"
#include "kernels/cuda/token_rows.h"
#include "kernels/cuda/write_kv.h"

namespace cachemgr {
namespace {

constexpr uint64_t kLayerAlignment = 2 << 20;

#define CUDA_RUNTIME_OR_RETURN(expr) CACHEMGR_CUDA_RETURN_IF_ERROR(expr)
// `drv` is the CudaDriver* in scope.
#define CUDA_DRIVER_OR_RETURN(expr)                                       \
  do {                                                                    \
    if (absl::Status s_ = drv->Check((expr), #expr); !s_.ok()) return s_; \
  } while (false)

uint64_t RoundUp(uint64_t x, uint64_t to) { return (x + to - 1) / to * to; }

// Device memory of one pool: the allocation, its mapping, what clients need to open it.
class CudaRegion {
 public:
  virtual ~CudaRegion() = default;
  virtual std::byte* base() const = 0;
  virtual uint64_t bytes() const = 0;
  virtual int share_fd() const { return -1; }
  virtual std::string ipc_handle() const { return {}; }
};

class VmmRegion final : public CudaRegion {
 public:
  static CUmemAllocationProp Properties(int ordinal) {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = ordinal;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    return prop;
  }

  // The size cuMemCreate gets for `want` bytes: rounded up to the recommended granularity.
  static absl::StatusOr<uint64_t> AllocationBytes(const CudaDriver* drv, int ordinal,
                                                  uint64_t want) {
    const CUmemAllocationProp prop = Properties(ordinal);
    size_t granularity = 0;
    CUDA_DRIVER_OR_RETURN(drv->MemGetAllocationGranularity(&granularity, &prop,
                                                           CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
    const std::optional<uint64_t> bytes = CheckedRoundUp(want, std::max<size_t>(granularity, 1));
    if (!bytes.has_value()) {
      return absl::InvalidArgumentError(absl::StrCat("num_blocks: a pool of ", want,
                                                     " bytes cannot be rounded to the device's "
                                                     "allocation granularity"));
    }
    return *bytes;
  }

  static absl::StatusOr<std::unique_ptr<VmmRegion>> Create(const CudaDriver* drv, int ordinal,
                                                           uint64_t want) {
    const CUmemAllocationProp prop = Properties(ordinal);
    size_t granularity = 0;
    CUDA_DRIVER_OR_RETURN(drv->MemGetAllocationGranularity(&granularity, &prop,
                                                           CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
    auto region = std::unique_ptr<VmmRegion>(new VmmRegion(drv));
    ASSIGN_OR_RETURN(region->bytes_, AllocationBytes(drv, ordinal, want));
    if (CUresult r = drv->MemCreate(&region->handle_, region->bytes_, &prop, 0);
        r != CUDA_SUCCESS) {
      if (r == CUDA_ERROR_OUT_OF_MEMORY) {
        return absl::ResourceExhaustedError(
            absl::StrCat("cuMemCreate of ", region->bytes_, " bytes: out of device memory"));
      }
      return drv->Check(r, "cuMemCreate");
    }
    region->created_ = true;
    absl::StatusOr<std::unique_ptr<VmmMapping>> mapping =
        VmmMapping::Map(drv, region->handle_, region->bytes_, granularity, ordinal);
    if (!mapping.ok()) return mapping.status();
    region->mapping_ = *std::move(mapping);
    int fd = -1;
    CUDA_DRIVER_OR_RETURN(drv->MemExportToShareableHandle(
        &fd, region->handle_, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
    region->fd_ = UniqueFd(fd);
    return region;
  }

  ~VmmRegion() override {
    mapping_.reset();  // unmapped before the allocation is released
    if (created_) drv_->MemRelease(handle_);
  }

  std::byte* base() const override { return mapping_->data(); }
  uint64_t bytes() const override { return bytes_; }
  int share_fd() const override { return fd_.get(); }

 private:
  explicit VmmRegion(const CudaDriver* drv) : drv_(drv) {}
  const CudaDriver* drv_;
  CUmemGenericAllocationHandle handle_{};
  uint64_t bytes_ = 0;
  bool created_ = false;
  std::unique_ptr<VmmMapping> mapping_;
  UniqueFd fd_;
};

class IpcRegion final : public CudaRegion {
 public:
  static absl::StatusOr<std::unique_ptr<IpcRegion>> Create(uint64_t bytes) {
    auto region = std::unique_ptr<IpcRegion>(new IpcRegion);
    if (cudaError_t e = cudaMalloc(&region->ptr_, bytes); e != cudaSuccess) {
      cudaGetLastError();
      if (e == cudaErrorMemoryAllocation) {
        return absl::ResourceExhaustedError(
            absl::StrCat("cudaMalloc of ", bytes, " bytes: out of device memory"));
      }
      return kernels::CudaErrorToStatus(e, "cudaMalloc", __FILE__, __LINE__);
    }
    region->bytes_ = bytes;
    cudaIpcMemHandle_t handle;
    CUDA_RUNTIME_OR_RETURN(cudaIpcGetMemHandle(&handle, region->ptr_));
    region->handle_.assign(reinterpret_cast<const char*>(&handle), sizeof(handle));
    return region;
  }
  ~IpcRegion() override {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }

  std::byte* base() const override { return static_cast<std::byte*>(ptr_); }
  uint64_t bytes() const override { return bytes_; }
  std::string ipc_handle() const override { return handle_; }

 private:
  IpcRegion() = default;
  void* ptr_ = nullptr;
  uint64_t bytes_ = 0;
  std::string handle_;
};

// A growable device buffer, reused across calls (callers hold the pool's mutex).
class Scratch {
 public:
  ~Scratch() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  absl::StatusOr<std::byte*> Get(size_t bytes) {
    if (bytes <= bytes_) return ptr_;
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    void* p = nullptr;
    CUDA_RUNTIME_OR_RETURN(cudaMalloc(&p, bytes));
    ptr_ = static_cast<std::byte*>(p);
    bytes_ = bytes;
    return ptr_;
  }

 private:
  std::byte* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class CudaPoolMemory final : public PoolMemory {
 public:
  CudaPoolMemory(int ordinal, kernels::KvLayerLayout layout, kernels::KvElemType type,
                 std::unique_ptr<CudaRegion> region, std::vector<LayerPlacement> layers,
                 cudaStream_t stream)
      : ordinal_(ordinal),
        layout_(layout),
        type_(type),
        region_(std::move(region)),
        layers_(std::move(layers)),
        stream_(stream) {
    RegionInfo info;
    info.bytes = region_->bytes();
    info.cuda_ipc_handle = region_->ipc_handle();
    regions_.push_back(std::move(info));
  }
  ~CudaPoolMemory() override {
    cudaSetDevice(ordinal_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }

  // Zeroes the whole region on the pool's stream and waits. The stream is non-blocking (it does
  // not synchronise with the legacy default stream), and clients may write as soon as Allocate
  // returns, so the clear must be complete, not merely queued, before the pool is handed out.
  absl::Status Clear() {
    CUDA_RUNTIME_OR_RETURN(cudaSetDevice(ordinal_));
    CUDA_RUNTIME_OR_RETURN(cudaMemsetAsync(region_->base(), 0, region_->bytes(), stream_));
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  const kernels::KvLayerLayout& layout() const override { return layout_; }
  const std::vector<RegionInfo>& regions() const override { return regions_; }
  const std::vector<LayerPlacement>& layers() const override { return layers_; }
  std::vector<int> ShareFds() const override {
    return region_->share_fd() >= 0 ? std::vector<int>{region_->share_fd()} : std::vector<int>{};
  }

  absl::Status CopyBlocks(uint32_t layer, absl::Span<const kernels::BlockCopyPair> pairs) override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    if (absl::Status s = kernels::ValidateBlockCopyPairs(layout_, pairs); !s.ok()) return s;
    if (pairs.empty()) return absl::OkStatus();
    absl::MutexLock lock(&mu_);
    CUDA_RUNTIME_OR_RETURN(cudaSetDevice(ordinal_));
    const size_t bytes = pairs.size() * sizeof(kernels::BlockCopyPair);
    absl::StatusOr<std::byte*> dev = scratch_.Get(bytes);
    if (!dev.ok()) return dev.status();
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(*dev, pairs.data(), bytes, cudaMemcpyHostToDevice, stream_));
    if (absl::Status s = kernels::CopyBlocksCuda(
            layout_, LayerBase(layer), reinterpret_cast<const kernels::BlockCopyPair*>(*dev),
            static_cast<uint32_t>(pairs.size()), stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  absl::Status GatherTokens(uint32_t layer, absl::Span<const int64_t> slots, float* keys,
                            float* values) const override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    if (absl::Status s = kernels::ValidateTokenSlots(layout_, type_, slots); !s.ok()) return s;
    if (slots.empty()) return absl::OkStatus();
    absl::MutexLock lock(&mu_);
    absl::StatusOr<RowBuffers> dev = StageSlots(slots);
    if (!dev.ok()) return dev.status();
    const size_t rows_bytes = dev->rows_bytes;
    if (absl::Status s = kernels::GatherTokensF32Cuda(layout_, type_, LayerBase(layer), dev->slots,
                                                      static_cast<uint32_t>(slots.size()),
                                                      dev->keys, dev->values, stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(keys, dev->keys, rows_bytes, cudaMemcpyDeviceToHost, stream_));
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(values, dev->values, rows_bytes, cudaMemcpyDeviceToHost, stream_));
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  absl::Status ScatterTokens(uint32_t layer, absl::Span<const int64_t> slots, const float* keys,
                             const float* values) override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    if (absl::Status s = kernels::ValidateTokenSlots(layout_, type_, slots); !s.ok()) return s;
    if (slots.empty()) return absl::OkStatus();
    absl::MutexLock lock(&mu_);
    absl::StatusOr<RowBuffers> dev = StageSlots(slots);
    if (!dev.ok()) return dev.status();
    const size_t rows_bytes = dev->rows_bytes;
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(dev->keys, keys, rows_bytes, cudaMemcpyHostToDevice, stream_));
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(dev->values, values, rows_bytes, cudaMemcpyHostToDevice, stream_));
    if (absl::Status s = kernels::ScatterTokensF32Cuda(layout_, type_, LayerBase(layer), dev->slots,
                                                       static_cast<uint32_t>(slots.size()),
                                                       dev->keys, dev->values, stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  // The rows gathered on the device as stored (ReadKvBySlotCuda), then to the host.
  absl::Status PackRows(uint32_t layer, absl::Span<const int64_t> slots, std::byte* keys,
                        std::byte* values) const override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    if (absl::Status s = kernels::ValidateTokenSlots(layout_, type_, slots); !s.ok()) return s;
    if (slots.empty()) return absl::OkStatus();
    absl::MutexLock lock(&mu_);
    absl::StatusOr<RowBuffers> dev = StageSlots(slots);  // float32 staging: room for the bytes
    if (!dev.ok()) return dev.status();
    const size_t bytes = slots.size() * layout_.token_bytes();
    auto* dev_keys = reinterpret_cast<std::byte*>(dev->keys);
    auto* dev_values = reinterpret_cast<std::byte*>(dev->values);
    if (absl::Status s =
            kernels::ReadKvBySlotCuda(layout_, LayerBase(layer), dev_keys, dev_values, dev->slots,
                                      static_cast<uint32_t>(slots.size()), stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(cudaMemcpyAsync(keys, dev_keys, bytes, cudaMemcpyDeviceToHost, stream_));
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(values, dev_values, bytes, cudaMemcpyDeviceToHost, stream_));
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  // The stored bytes to the device, then reshape_and_cache (WriteKvBySlotCuda).
  absl::Status UnpackRows(uint32_t layer, absl::Span<const int64_t> slots, const std::byte* keys,
                          const std::byte* values) override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    if (absl::Status s = kernels::ValidateTokenSlots(layout_, type_, slots); !s.ok()) return s;
    if (slots.empty()) return absl::OkStatus();
    absl::MutexLock lock(&mu_);
    absl::StatusOr<RowBuffers> dev = StageSlots(slots);  // float32 staging: room for the bytes
    if (!dev.ok()) return dev.status();
    const size_t bytes = slots.size() * layout_.token_bytes();
    auto* dev_keys = reinterpret_cast<std::byte*>(dev->keys);
    auto* dev_values = reinterpret_cast<std::byte*>(dev->values);
    CUDA_RUNTIME_OR_RETURN(cudaMemcpyAsync(dev_keys, keys, bytes, cudaMemcpyHostToDevice, stream_));
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(dev_values, values, bytes, cudaMemcpyHostToDevice, stream_));
    if (absl::Status s =
            kernels::WriteKvBySlotCuda(layout_, LayerBase(layer), dev_keys, dev_values, dev->slots,
                                       static_cast<uint32_t>(slots.size()), stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  int cuda_device() const override { return ordinal_; }

  // ReadKvBySlotCuda straight into device buffers (a row link's): no host hop.
  absl::Status PackRowsOnDevice(uint32_t layer, absl::Span<const int64_t> slots, std::byte* keys,
                                std::byte* values) const override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    if (absl::Status s = kernels::ValidateTokenSlots(layout_, type_, slots); !s.ok()) return s;
    if (slots.empty()) return absl::OkStatus();
    absl::MutexLock lock(&mu_);
    absl::StatusOr<RowBuffers> dev = StageSlots(slots);
    if (!dev.ok()) return dev.status();
    if (absl::Status s =
            kernels::ReadKvBySlotCuda(layout_, LayerBase(layer), keys, values, dev->slots,
                                      static_cast<uint32_t>(slots.size()), stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  // WriteKvBySlotCuda straight from device buffers (a row link's).
  absl::Status UnpackRowsOnDevice(uint32_t layer, absl::Span<const int64_t> slots,
                                  const std::byte* keys, const std::byte* values) override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    if (absl::Status s = kernels::ValidateTokenSlots(layout_, type_, slots); !s.ok()) return s;
    if (slots.empty()) return absl::OkStatus();
    absl::MutexLock lock(&mu_);
    absl::StatusOr<RowBuffers> dev = StageSlots(slots);
    if (!dev.ok()) return dev.status();
    if (absl::Status s =
            kernels::WriteKvBySlotCuda(layout_, LayerBase(layer), keys, values, dev->slots,
                                       static_cast<uint32_t>(slots.size()), stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  absl::Status CompactHeads(uint32_t layer, absl::Span<const uint32_t> block_table,
                            uint32_t num_tokens, absl::Span<const uint32_t> kept,
                            uint32_t rows) override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    if (absl::Status s = kernels::ValidateCompaction(layout_, block_table, num_tokens, kept, rows);
        !s.ok()) {
      return s;
    }
    if (rows == 0) return absl::OkStatus();
    absl::MutexLock lock(&mu_);
    CUDA_RUNTIME_OR_RETURN(cudaSetDevice(ordinal_));
    const size_t table_bytes = block_table.size() * sizeof(uint32_t);
    const size_t kept_bytes = kept.size() * sizeof(uint32_t);
    const size_t work = kernels::CompactHeadsScratchBytes(layout_, rows);
    absl::StatusOr<std::byte*> dev =
        scratch_.Get(RoundUp(table_bytes, 256) + RoundUp(kept_bytes, 256) + work);
    if (!dev.ok()) return dev.status();
    auto* dev_table = reinterpret_cast<uint32_t*>(*dev);
    auto* dev_kept = reinterpret_cast<uint32_t*>(*dev + RoundUp(table_bytes, 256));
    std::byte* dev_work = *dev + RoundUp(table_bytes, 256) + RoundUp(kept_bytes, 256);
    CUDA_RUNTIME_OR_RETURN(cudaMemcpyAsync(dev_table, block_table.data(), table_bytes,
                                           cudaMemcpyHostToDevice, stream_));
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(dev_kept, kept.data(), kept_bytes, cudaMemcpyHostToDevice, stream_));
    if (absl::Status s = kernels::CompactHeadsCuda(layout_, LayerBase(layer), dev_table, dev_kept,
                                                   rows, dev_work, stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  // Gathers the keys into device rows, runs the attention kernels on them and copies only the
  // sums out (queries in, [num_q_heads, n] floats out).
  absl::Status AttentionColumnSums(uint32_t layer, absl::Span<const int64_t> slots,
                                   uint32_t num_q_heads, const float* queries, uint32_t num_queries,
                                   float* sums) const override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    if (absl::Status s =
            ValidateScoringArgs(layout_, slots.size(), num_q_heads, queries, num_queries, sums);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = kernels::ValidateTokenSlots(layout_, type_, slots); !s.ok()) return s;
    kernels::AttentionShape shape;
    shape.num_tokens = static_cast<uint32_t>(slots.size());
    shape.num_q_heads = num_q_heads;
    shape.num_kv_heads = layout_.num_kv_heads;
    shape.head_dim = layout_.head_dim;
    shape.num_queries = num_queries;
    const size_t query_bytes = size_t{num_queries} * num_q_heads * layout_.head_dim * sizeof(float);
    const size_t sums_bytes = size_t{num_q_heads} * slots.size() * sizeof(float);
    absl::MutexLock lock(&mu_);
    absl::StatusOr<RowBuffers> rows = StageSlots(slots);
    if (!rows.ok()) return rows.status();
    absl::StatusOr<std::byte*> dev =
        compute_scratch_.Get(RoundUp(query_bytes, 256) + RoundUp(sums_bytes, 256) +
                             kernels::AttentionScratchBytes(shape));
    if (!dev.ok()) return dev.status();
    auto* dev_queries = reinterpret_cast<float*>(*dev);
    auto* dev_sums = reinterpret_cast<float*>(*dev + RoundUp(query_bytes, 256));
    std::byte* dev_work = *dev + RoundUp(query_bytes, 256) + RoundUp(sums_bytes, 256);
    if (absl::Status s =
            kernels::GatherTokensF32Cuda(layout_, type_, LayerBase(layer), rows->slots,
                                         shape.num_tokens, rows->keys, rows->values, stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(dev_queries, queries, query_bytes, cudaMemcpyHostToDevice, stream_));
    if (absl::Status s = kernels::AttentionColumnSumsCuda(shape, rows->keys, dev_queries, dev_sums,
                                                          dev_work, stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(sums, dev_sums, sums_bytes, cudaMemcpyDeviceToHost, stream_));
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  const compress::SimilarityGraphBuilder* similarity_graph() const override { return &graph_; }
  const compress::TopKRanker* ranker() const override { return &ranker_; }
  bool computes_on_device() const override { return true; }

  // Uploads the flat codebook, then on the pool's stream: eq. 14 for K and V into device rows,
  // RoPE on the coded K vectors, the scatter into the pool.
  absl::Status ScatterCodedRows(uint32_t layer, absl::Span<const int64_t> slots,
                                const compress::CodedRows& coded) override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    if (absl::Status s = ValidateCodedRowsArgs(layout_, slots.size(), coded); !s.ok()) return s;
    if (absl::Status s = kernels::ValidateTokenSlots(layout_, type_, slots); !s.ok()) return s;
    if (slots.empty()) return absl::OkStatus();
    const uint32_t vectors = coded.rows * coded.num_kv_heads;
    const uint32_t dim = coded.head_dim;
    absl::MutexLock lock(&mu_);
    absl::StatusOr<RowBuffers> rows = StageSlots(slots);
    if (!rows.ok()) return rows.status();
    // The uploads, in one scratch buffer at 256-byte aligned offsets.
    struct Upload {
      const void* host;
      size_t bytes;
      size_t offset = 0;
    };
    Upload uploads[] = {
        {coded.key_entries.data(), coded.key_entries.size() * sizeof(float)},
        {coded.value_entries.data(), coded.value_entries.size() * sizeof(float)},
        {coded.key_refs.data(), coded.key_refs.size() * sizeof(uint32_t)},
        {coded.value_refs.data(), coded.value_refs.size() * sizeof(uint32_t)},
        {coded.key_magnitudes.data(), coded.key_magnitudes.size() * sizeof(float)},
        {coded.value_magnitudes.data(), coded.value_magnitudes.size() * sizeof(float)},
        {coded.key_angle_rows.data(), coded.key_angle_rows.size() * sizeof(uint32_t)},
        {coded.angles.cos.data(), coded.angles.cos.size() * sizeof(float)},
        {coded.angles.sin.data(), coded.angles.sin.size() * sizeof(float)},
    };
    size_t total = 0;
    for (Upload& u : uploads) {
      u.offset = total;
      total += RoundUp(std::max<size_t>(u.bytes, 1), 256);
    }
    absl::StatusOr<std::byte*> dev = compute_scratch_.Get(total);
    if (!dev.ok()) return dev.status();
    for (const Upload& u : uploads) {
      if (u.bytes == 0) continue;
      CUDA_RUNTIME_OR_RETURN(
          cudaMemcpyAsync(*dev + u.offset, u.host, u.bytes, cudaMemcpyHostToDevice, stream_));
    }
    auto at = [&](int i) { return *dev + uploads[i].offset; };
    const auto* key_entries = reinterpret_cast<const float*>(at(0));
    const auto* value_entries = reinterpret_cast<const float*>(at(1));
    const auto* key_refs = reinterpret_cast<const uint32_t*>(at(2));
    const auto* value_refs = reinterpret_cast<const uint32_t*>(at(3));
    const auto* key_magnitudes = reinterpret_cast<const float*>(at(4));
    const auto* value_magnitudes = reinterpret_cast<const float*>(at(5));
    const auto* angle_rows = reinterpret_cast<const uint32_t*>(at(6));
    const auto* cos = reinterpret_cast<const float*>(at(7));
    const auto* sin = reinterpret_cast<const float*>(at(8));
    if (absl::Status s = kernels::ReconstructCodebookCuda(
            key_entries, static_cast<uint32_t>(coded.key_entries.size() / dim), key_refs,
            key_magnitudes, vectors, dim, rows->keys, stream_);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = kernels::ReconstructCodebookCuda(
            value_entries, static_cast<uint32_t>(coded.value_entries.size() / dim), value_refs,
            value_magnitudes, vectors, dim, rows->values, stream_);
        !s.ok()) {
      return s;
    }
    const uint32_t pairs = coded.angles.num_pairs;
    if (coded.rope.style != compress::RopeStyle::kNone && pairs > 0) {
      const kernels::RopePairing pairing = coded.rope.style == compress::RopeStyle::kInterleaved
                                               ? kernels::RopePairing::kInterleaved
                                               : kernels::RopePairing::kHalfSplit;
      if (absl::Status s = kernels::RotateRowsCuda(
              pairing, dim, pairs, cos, sin, static_cast<uint32_t>(coded.angles.cos.size() / pairs),
              angle_rows, vectors,
              /*heads=*/1, rows->keys, /*inverse=*/false, stream_);
          !s.ok()) {
        return s;
      }
    }
    if (absl::Status s =
            kernels::ScatterTokensF32Cuda(layout_, type_, LayerBase(layer), rows->slots, coded.rows,
                                          rows->keys, rows->values, stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  // Copies the blocks the tokens use into a compact host image (block i of the table at index
  // i) and digests that.
  absl::StatusOr<uint64_t> DigestLayer(uint32_t layer, absl::Span<const uint32_t> block_table,
                                       uint32_t num_tokens, KvDigest kind) const override {
    if (layer >= layers_.size()) return absl::InvalidArgumentError("layer out of range");
    const uint64_t blocks = (uint64_t{num_tokens} + layout_.block_size - 1) / layout_.block_size;
    if (block_table.size() < blocks) {
      return absl::InvalidArgumentError("block table shorter than the token count");
    }
    for (uint32_t b : block_table) {
      if (b >= layout_.num_blocks) return absl::InvalidArgumentError("block id out of range");
    }
    if (blocks == 0) {
      return kind == KvDigest::kXxh3 ? Xxh3LayerTokens(layout_, nullptr, nullptr, 0)
                                     : kernels::kFnv1a64Offset;
    }
    kernels::KvLayerLayout image_layout = layout_;
    image_layout.num_blocks = static_cast<uint32_t>(blocks);
    std::vector<std::byte> image(image_layout.layer_bytes());
    absl::MutexLock lock(&mu_);
    CUDA_RUNTIME_OR_RETURN(cudaSetDevice(ordinal_));
    for (uint32_t i = 0; i < blocks; ++i) {
      for (kernels::KvPlane plane : {kernels::KvPlane::kKey, kernels::KvPlane::kValue}) {
        CUDA_RUNTIME_OR_RETURN(
            cudaMemcpyAsync(image.data() + image_layout.block_offset(plane, i),
                            LayerBase(layer) + layout_.block_offset(plane, block_table[i]),
                            layout_.plane_block_bytes(), cudaMemcpyDeviceToHost, stream_));
      }
    }
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    std::vector<uint32_t> identity(blocks);
    for (uint32_t i = 0; i < blocks; ++i) identity[i] = i;
    return kind == KvDigest::kXxh3
               ? Xxh3LayerTokens(image_layout, image.data(), identity.data(), num_tokens)
               : kernels::DigestLayerTokens(image_layout, image.data(), identity.data(),
                                            num_tokens);
  }

 private:
  std::byte* LayerBase(uint32_t layer) const { return region_->base() + layers_[layer].offset; }

  // Device scratch for a gather or scatter of `slots`: the slots (copied in, on the stream) and
  // float32 key and value rows.
  struct RowBuffers {
    int64_t* slots;
    float* keys;
    float* values;
    size_t rows_bytes;  // of keys (and of values)
  };
  absl::StatusOr<RowBuffers> StageSlots(absl::Span<const int64_t> slots) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    CUDA_RUNTIME_OR_RETURN(cudaSetDevice(ordinal_));
    const size_t row = size_t{layout_.num_kv_heads} * layout_.head_dim;
    const size_t slot_bytes = slots.size() * sizeof(int64_t);
    RowBuffers b;
    b.rows_bytes = slots.size() * row * sizeof(float);
    absl::StatusOr<std::byte*> dev = scratch_.Get(RoundUp(slot_bytes, 256) + 2 * b.rows_bytes);
    if (!dev.ok()) return dev.status();
    b.slots = reinterpret_cast<int64_t*>(*dev);
    b.keys = reinterpret_cast<float*>(*dev + RoundUp(slot_bytes, 256));
    b.values = b.keys + slots.size() * row;
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(b.slots, slots.data(), slot_bytes, cudaMemcpyHostToDevice, stream_));
    return b;
  }

  // Eq. 9 on the device (SimilarityAdjacencyCuda, bit-identical to the CPU pass): unit vectors
  // in, the bitset out; the greedy rounds stay on the host.
  class DeviceSimilarityGraph final : public compress::SimilarityGraphBuilder {
   public:
    explicit DeviceSimilarityGraph(const CudaPoolMemory* pool) : pool_(pool) {}
    absl::Status Build(const float* unit, const uint8_t* nonzero, size_t n, uint32_t dim,
                       float theta, uint64_t* adjacency) const override {
      return pool_->BuildSimilarityGraph(unit, nonzero, n, dim, theta, adjacency);
    }

   private:
    const CudaPoolMemory* pool_;
  };

  // RankTopKCuda (a stable segmented radix sort, bit-identical to RankTopK): score rows in,
  // the first k tokens of each row's ranking out.
  class DeviceRanker final : public compress::TopKRanker {
   public:
    explicit DeviceRanker(const CudaPoolMemory* pool) : pool_(pool) {}
    absl::Status Rank(absl::Span<const float> scores, uint32_t num_rows, uint32_t context,
                      uint32_t k, uint32_t* ranked) const override {
      return pool_->RankRows(scores, num_rows, context, k, ranked);
    }

   private:
    const CudaPoolMemory* pool_;
  };

  absl::Status RankRows(absl::Span<const float> scores, uint32_t num_rows, uint32_t context,
                        uint32_t k, uint32_t* ranked) const {
    if (scores.size() != size_t{num_rows} * context) {
      return absl::InvalidArgumentError(absl::StrCat("ranking ", num_rows, " rows of ", context,
                                                     " scores from ", scores.size(), " floats"));
    }
    if (num_rows == 0 || k == 0) return absl::OkStatus();
    const size_t scores_bytes = scores.size() * sizeof(float);
    const size_t ranked_bytes = size_t{num_rows} * k * sizeof(uint32_t);
    const size_t work = kernels::RankTopKScratchBytes(num_rows, context);
    absl::MutexLock lock(&mu_);
    CUDA_RUNTIME_OR_RETURN(cudaSetDevice(ordinal_));
    absl::StatusOr<std::byte*> dev =
        compute_scratch_.Get(RoundUp(scores_bytes, 256) + RoundUp(ranked_bytes, 256) + work);
    if (!dev.ok()) return dev.status();
    auto* dev_scores = reinterpret_cast<float*>(*dev);
    auto* dev_ranked = reinterpret_cast<uint32_t*>(*dev + RoundUp(scores_bytes, 256));
    std::byte* dev_work = *dev + RoundUp(scores_bytes, 256) + RoundUp(ranked_bytes, 256);
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(dev_scores, scores.data(), scores_bytes, cudaMemcpyHostToDevice, stream_));
    if (absl::Status s = kernels::RankTopKCuda(dev_scores, num_rows, context, k, dev_ranked,
                                               dev_work, work, stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(ranked, dev_ranked, ranked_bytes, cudaMemcpyDeviceToHost, stream_));
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  absl::Status BuildSimilarityGraph(const float* unit, const uint8_t* nonzero, size_t n,
                                    uint32_t dim, float theta, uint64_t* adjacency) const {
    if (n == 0) return absl::OkStatus();
    if (n > (size_t{1} << 20)) {
      return absl::InvalidArgumentError(
          absl::StrCat("similarity graph of ", n, " vectors exceeds the device pass's 2^20"));
    }
    const size_t unit_bytes = n * dim * sizeof(float);
    const size_t words = (n + 63) / 64;
    const size_t adjacency_bytes = n * words * sizeof(uint64_t);
    absl::MutexLock lock(&mu_);
    CUDA_RUNTIME_OR_RETURN(cudaSetDevice(ordinal_));
    absl::StatusOr<std::byte*> dev =
        compute_scratch_.Get(RoundUp(unit_bytes, 256) + RoundUp(n, 256) + adjacency_bytes);
    if (!dev.ok()) return dev.status();
    auto* dev_unit = reinterpret_cast<float*>(*dev);
    auto* dev_nonzero = reinterpret_cast<uint8_t*>(*dev + RoundUp(unit_bytes, 256));
    auto* dev_adjacency =
        reinterpret_cast<uint64_t*>(*dev + RoundUp(unit_bytes, 256) + RoundUp(n, 256));
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(dev_unit, unit, unit_bytes, cudaMemcpyHostToDevice, stream_));
    CUDA_RUNTIME_OR_RETURN(
        cudaMemcpyAsync(dev_nonzero, nonzero, n, cudaMemcpyHostToDevice, stream_));
    if (absl::Status s = kernels::SimilarityAdjacencyCuda(
            dev_unit, dev_nonzero, static_cast<uint32_t>(n), dim, theta, dev_adjacency, stream_);
        !s.ok()) {
      return s;
    }
    CUDA_RUNTIME_OR_RETURN(cudaMemcpyAsync(adjacency, dev_adjacency, adjacency_bytes,
                                           cudaMemcpyDeviceToHost, stream_));
    CUDA_RUNTIME_OR_RETURN(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  const int ordinal_;
  const kernels::KvLayerLayout layout_;
  const kernels::KvElemType type_;
  std::unique_ptr<CudaRegion> region_;
  std::vector<RegionInfo> regions_;
  std::vector<LayerPlacement> layers_;
  cudaStream_t stream_;
  // Compress runs layers on several threads: device calls and the scratch are serialised.
  mutable absl::Mutex mu_;
  mutable Scratch scratch_ ABSL_GUARDED_BY(mu_);
  // The compute calls' second buffer (scratch_ holds their staged rows).
  mutable Scratch compute_scratch_ ABSL_GUARDED_BY(mu_);
  const DeviceSimilarityGraph graph_{this};
  const DeviceRanker ranker_{this};
};

// A client's interprocess event, opened once (cudaIpcOpenEventHandle) and closed on destruction.
class CudaClientEvent final : public ClientEvent {
 public:
  static absl::StatusOr<std::unique_ptr<CudaClientEvent>> Open(int ordinal,
                                                               const std::string& handle) {
    cudaIpcEventHandle_t h;
    if (handle.size() != sizeof(h)) {
      return absl::InvalidArgumentError(absl::StrCat("cuda_ipc_event_handle must be ", sizeof(h),
                                                     " bytes (got ", handle.size(), ")"));
    }
    std::memcpy(&h, handle.data(), sizeof(h));
    CUDA_RUNTIME_OR_RETURN(cudaSetDevice(ordinal));
    cudaEvent_t event = nullptr;
    if (cudaError_t e = cudaIpcOpenEventHandle(&event, h); e != cudaSuccess) {
      cudaGetLastError();
      return absl::InvalidArgumentError(absl::StrCat(
          "cuda_ipc_event_handle cannot be opened on this daemon's device: ", cudaGetErrorName(e),
          " (", cudaGetErrorString(e),
          "); create it with cudaEventInterprocess | cudaEventDisableTiming"));
    }
    return std::unique_ptr<CudaClientEvent>(new CudaClientEvent(ordinal, event));
  }
  ~CudaClientEvent() override {
    cudaSetDevice(ordinal_);
    cudaEventDestroy(event_);
  }

  absl::Status Wait() const override {
    CUDA_RUNTIME_OR_RETURN(cudaSetDevice(ordinal_));
    CUDA_RUNTIME_OR_RETURN(cudaEventSynchronize(event_));
    return absl::OkStatus();
  }

 private:
  CudaClientEvent(int ordinal, cudaEvent_t event) : ordinal_(ordinal), event_(event) {}
  const int ordinal_;
  const cudaEvent_t event_;
};

absl::StatusOr<int> FindDevice(const std::string& want, std::string* uuid) {
  absl::StatusOr<std::vector<std::string>> uuids = CudaDeviceUuids();
  if (!uuids.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("--backend=cuda: ", uuids.status().message()));
  }
  std::vector<std::string> seen;
  for (int d = 0; d < static_cast<int>(uuids->size()); ++d) {
    const std::string& id = (*uuids)[d];
    seen.push_back(absl::StrCat(d, "=", id));
    if (want == id || want == absl::StrCat(d)) {
      *uuid = id;
      return d;
    }
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "--cuda_device=", want, " matches no device (have ", absl::StrJoin(seen, ", "), ")"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(
    const CudaBackendOptions& options) {
  std::string uuid;
  absl::StatusOr<int> ordinal = FindDevice(options.device, &uuid);
  if (!ordinal.ok()) return ordinal.status();
  CUDA_RUNTIME_OR_RETURN(cudaSetDevice(*ordinal));
  absl::StatusOr<const CudaDriver*> driver = LoadCudaDriver();
  if (!driver.ok()) return driver.status();
  const CudaDriver* drv = *driver;
  CUdevice dev;
  CUDA_DRIVER_OR_RETURN(drv->DeviceGet(&dev, *ordinal));
  if (options.share_method == ShareMethod::kCudaVmmFd) {
    int vmm = 0, posix_fd = 0;
    CUDA_DRIVER_OR_RETURN(drv->DeviceGetAttribute(
        &vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev));
    CUDA_DRIVER_OR_RETURN(drv->DeviceGetAttribute(
        &posix_fd, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, dev));
    if (!vmm || !posix_fd) {
      return absl::FailedPreconditionError(
          absl::StrCat("--cuda_share=vmm_fd: device ", uuid, " does not support ",
                       !vmm ? "the virtual memory management API" : "POSIX file descriptor handles",
                       "; try --cuda_share=ipc_handle"));
    }
  } else if (options.share_method == ShareMethod::kCudaIpcHandle) {
    // Legacy IPC has no capability attribute: export a probe allocation's handle.
    absl::StatusOr<std::unique_ptr<IpcRegion>> probe = IpcRegion::Create(1 << 20);
    if (!probe.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--cuda_share=ipc_handle: device ", uuid, " cannot export a CUDA IPC handle: ",
          probe.status().message(), "; try --cuda_share=vmm_fd"));
    }
  } else {
    return absl::InvalidArgumentError("the CUDA backend shares by vmm_fd or ipc_handle");
  }
  return std::unique_ptr<CudaBackend>(new CudaBackend(drv, *ordinal, uuid, options.share_method));
}

absl::StatusOr<std::unique_ptr<ClientEvent>> CudaBackend::OpenClientEvent(
    const std::string& handle) const {
  absl::StatusOr<std::unique_ptr<CudaClientEvent>> event = CudaClientEvent::Open(ordinal_, handle);
  if (!event.ok()) return event.status();
  return std::unique_ptr<ClientEvent>(*std::move(event));
}

absl::StatusOr<uint64_t> CudaBackend::PoolBytes(const kernels::KvLayerLayout& layout,
                                                uint32_t num_layers) const {
  ASSIGN_OR_RETURN(const PoolPlan plan, PlanPool(layout, num_layers, kLayerAlignment));
  // cudaMalloc takes the 2 MiB-aligned total as it is; cuMemCreate rounds to its granularity.
  if (share_method_ != ShareMethod::kCudaVmmFd) return plan.total_bytes;
  return VmmRegion::AllocationBytes(driver_, ordinal_, plan.total_bytes);
}

absl::StatusOr<std::unique_ptr<PoolMemory>> CudaBackend::CreatePool(
    const std::string& pool_id, const kernels::KvLayerLayout& layout, kernels::KvElemType type,
    uint32_t num_layers) {
  (void)pool_id;
  CUDA_RUNTIME_OR_RETURN(cudaSetDevice(ordinal_));
  ASSIGN_OR_RETURN(const PoolPlan plan, PlanPool(layout, num_layers, kLayerAlignment));
  std::vector<LayerPlacement> layers(num_layers);
  // l * stride < total_bytes, which PlanPool checked.
  for (uint32_t l = 0; l < num_layers; ++l) layers[l] = {0, l * plan.stride, plan.layer_bytes};
  const uint64_t total = plan.total_bytes;
  std::unique_ptr<CudaRegion> region;
  if (share_method_ == ShareMethod::kCudaVmmFd) {
    absl::StatusOr<std::unique_ptr<VmmRegion>> r = VmmRegion::Create(driver_, ordinal_, total);
    if (!r.ok()) return r.status();
    region = *std::move(r);
  } else {
    absl::StatusOr<std::unique_ptr<IpcRegion>> r = IpcRegion::Create(total);
    if (!r.ok()) return r.status();
    region = *std::move(r);
  }
  cudaStream_t stream = nullptr;
  CUDA_RUNTIME_OR_RETURN(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // The pool owns the stream from here (it destroys it), so a failed clear frees both.
  auto pool = std::make_unique<CudaPoolMemory>(ordinal_, layout, type, std::move(region),
                                               std::move(layers), stream);
  if (absl::Status s = pool->Clear(); !s.ok()) return s;
  return pool;
}

}  // namespace cachemgr
