// Upper bounds on the encoded size of the cachemgr.v1 replies that grow with a sequence
// (Allocate, GetSequence, Fork, Compress, Fetch), computed from counts before the reply, or the
// state it describes, is built: the manager refuses a call whose reply would exceed
// CacheManagerOptions::max_reply_bytes instead of building a message no client can receive.
//
// Every bound is >= the protobuf encoding of the reply proto_convert.cc builds (each field
// counted with its largest tag and varint; tests/cachemgr/reply_size_test.cc checks this against
// ByteSizeLong). Arithmetic saturates, so an absurd count gives a bound over any limit.
// Pure functions, thread-safe.
#pragma once

#include <cstdint>

#include "absl/types/span.h"

namespace cachemgr::reply_size {

// Bytes of the varint encoding of `value` (1..10).
uint64_t VarintBytes(uint64_t value);

// AllocateResponse for `num_new_tokens` tokens appended in each of `num_layers` layers of a pool
// of `pool_blocks` blocks of `block_size` tokens (whatever the sequence held before).
uint64_t AllocateReplyBytes(uint32_t num_layers, uint64_t num_new_tokens, uint32_t pool_blocks,
                            uint32_t block_size);

// What one layer's entry of a reply lists: block ids and token positions.
struct LayerCounts {
  uint64_t blocks = 0;     // block ids (each < the pool's block count)
  uint64_t positions = 0;  // positions or kept positions (each < the sequence's positions)
};

// The longest status message a StepResult carries (CacheManager::Step cuts longer ones).
inline constexpr uint64_t kMaxStepMessageBytes = 2048;

// One StepResponse.results entry: an op's status and, for an allocation of `num_new_tokens`
// tokens (0 for a free, a fork or a prefix lookup), its layers' new blocks and copies, with slot
// mappings only with `slot_mapping`.
uint64_t StepResultBytes(uint32_t num_layers, uint64_t num_new_tokens, uint32_t pool_blocks,
                         uint32_t block_size, bool slot_mapping);

// GetSequenceResponse or ForkResponse (a SequenceInfo) of a sequence whose layers list
// layers[l].blocks block ids (positions ignored).
uint64_t SequenceReplyBytes(absl::Span<const LayerCounts> layers, uint32_t pool_blocks);

// CompressResponse: per layer, the blocks it keeps and its kept_positions entries.
uint64_t CompressReplyBytes(absl::Span<const LayerCounts> layers, uint32_t pool_blocks,
                            uint64_t num_positions);

// FetchResponse: per listed layer, its block ids and positions entries.
uint64_t FetchReplyBytes(absl::Span<const LayerCounts> layers, uint32_t pool_blocks,
                         uint64_t num_positions);

}  // namespace cachemgr::reply_size
