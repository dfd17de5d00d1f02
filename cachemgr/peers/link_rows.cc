#include "cachemgr/peers/link_rows.h"

#include <algorithm>
#include <memory>

#include "absl/strings/str_cat.h"
#include "cachemgr/util/status_macros.h"

namespace cachemgr {
namespace {

// Whether the link's buffers are the pool's device memory (else host memory).
absl::StatusOr<bool> OnDevice(const SequenceInTransit& sequence, const RowLink& link) {
  if (link.device() < 0) return false;
  if (link.device() == sequence.memory->cuda_device()) return true;
  return absl::FailedPreconditionError(
      absl::StrCat("the row link is on CUDA device ", link.device(), ", the pool's memory ",
                   sequence.memory->cuda_device() < 0
                       ? std::string("is not one device's")
                       : absl::StrCat("on device ", sequence.memory->cuda_device())));
}

// Calls fn(layer, first, count) for every message of the transfer, in order.
template <typename Fn>
absl::Status ForEachChunk(const SequenceImageHeader& header, uint32_t chunk_rows, Fn fn) {
  for (uint32_t l = 0; l < header.layers.size(); ++l) {
    if (header.layers[l].coded) continue;
    const uint32_t rows = header.layers[l].num_tokens;
    for (uint32_t first = 0; first < rows; first += chunk_rows) {
      RETURN_IF_ERROR(fn(l, first, std::min(chunk_rows, rows - first)));
    }
  }
  return absl::OkStatus();
}

// A buffer for the largest message of the transfer.
absl::StatusOr<std::unique_ptr<LinkBuffer>> ChunkBuffer(const SequenceImageHeader& header,
                                                        RowLink& link, uint32_t chunk_rows) {
  uint32_t largest = 0;
  for (const SequenceImageLayer& l : header.layers) {
    if (!l.coded) largest = std::max(largest, std::min(l.num_tokens, chunk_rows));
  }
  return link.NewBuffer(2 * uint64_t{largest} * header.RowBytes());
}

}  // namespace

uint32_t LinkChunkRows(const SequenceImageHeader& header, uint64_t chunk_bytes) {
  const uint64_t pair = std::max<uint64_t>(1, 2 * header.RowBytes());
  return static_cast<uint32_t>(std::clamp<uint64_t>(chunk_bytes / pair, 1, UINT32_MAX));
}

absl::Status SendRowsOverLink(const SequenceInTransit& sequence, RowLink& link, uint32_t chunk_rows,
                              const LinkWait& wait, uint64_t* bytes) {
  ASSIGN_OR_RETURN(const bool on_device, OnDevice(sequence, link));
  const uint64_t row_bytes = sequence.header.RowBytes();
  ASSIGN_OR_RETURN(std::unique_ptr<LinkBuffer> buffer,
                   ChunkBuffer(sequence.header, link, chunk_rows));
  *bytes = 0;
  return ForEachChunk(sequence.header, chunk_rows,
                      [&](uint32_t layer, uint32_t first, uint32_t count) -> absl::Status {
                        const uint64_t half = uint64_t{count} * row_bytes;
                        RETURN_IF_ERROR(sequence.ReadRowsInto(layer, first, count, buffer->data(),
                                                              buffer->data() + half, on_device));
                        RETURN_IF_ERROR(link.Send(buffer->data(), 2 * half, wait));
                        *bytes += 2 * half;
                        return absl::OkStatus();
                      });
}

absl::Status ReceiveRowsOverLink(const SequenceInTransit& sequence, RowLink& link,
                                 uint32_t chunk_rows, const LinkWait& wait) {
  ASSIGN_OR_RETURN(const bool on_device, OnDevice(sequence, link));
  const uint64_t row_bytes = sequence.header.RowBytes();
  ASSIGN_OR_RETURN(std::unique_ptr<LinkBuffer> buffer,
                   ChunkBuffer(sequence.header, link, chunk_rows));
  return ForEachChunk(sequence.header, chunk_rows,
                      [&](uint32_t layer, uint32_t first, uint32_t count) -> absl::Status {
                        const uint64_t half = uint64_t{count} * row_bytes;
                        RETURN_IF_ERROR(link.Recv(buffer->data(), 2 * half, wait));
                        return sequence.WriteRowsFrom(layer, first, count, buffer->data(),
                                                      buffer->data() + half, on_device);
                      });
}

}  // namespace cachemgr
