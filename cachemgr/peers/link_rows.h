// The rows of a transfer over a row link (row_link.h): every layer that is not coded, in layer
// order, `chunk_rows` rows per message (keys then values, as stored). Both sides derive the same
// message sizes from the header, so the link carries nothing but row bytes. Rows are packed in
// the link's memory: on its CUDA device when the pool is on that device (no host hop), in host
// memory when the link takes host memory.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/peers/row_link.h"

namespace cachemgr {

// Rows per link message: as many as fit `chunk_bytes` (at least one).
uint32_t LinkChunkRows(const SequenceImageHeader& header, uint64_t chunk_bytes);

// Sends every non-coded layer's rows of `sequence`; `*bytes` counts the row bytes sent.
// FAILED_PRECONDITION when the link's memory is neither the host's nor the pool's device; the
// link's errors otherwise.
absl::Status SendRowsOverLink(const SequenceInTransit& sequence, RowLink& link, uint32_t chunk_rows,
                              const LinkWait& wait, uint64_t* bytes);

// Receives them into `sequence` (an import), in the same order.
absl::Status ReceiveRowsOverLink(const SequenceInTransit& sequence, RowLink& link,
                                 uint32_t chunk_rows, const LinkWait& wait);

}  // namespace cachemgr
