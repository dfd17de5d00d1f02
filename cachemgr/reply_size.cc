#include "cachemgr/reply_size.h"

#include <initializer_list>

#include "cachemgr/cache_manager.h"
#include "cachemgr/util/checked_math.h"

namespace cachemgr::reply_size {
namespace {

// Every field number of the replies is < 2048, so a tag takes at most 2 bytes.
constexpr uint64_t kTag = 2;
// Largest varint of a 32-bit value, of a 64-bit value.
constexpr uint64_t kVarint32 = 5, kVarint64 = 10;
// The strings a SequenceInfo carries besides the ids: the policy name (a preset's) and the
// busy call's name.
constexpr uint64_t kMaxShortString = 64;
// A client id ("c" and a serial).
constexpr uint64_t kMaxClientId = 24;

uint64_t Add(uint64_t a, uint64_t b) { return SaturatingAdd(a, b); }
uint64_t Mul(uint64_t a, uint64_t b) { return SaturatingMul(a, b); }
uint64_t Sum(std::initializer_list<uint64_t> terms) {
  uint64_t out = 0;
  for (uint64_t t : terms) out = Add(out, t);
  return out;
}

// A scalar field: tag and value.
uint64_t Scalar(uint64_t value_bytes) { return kTag + value_bytes; }
// A length-delimited field (string, packed array, embedded message) of `payload` bytes.
uint64_t Delimited(uint64_t payload) { return Add(kTag + VarintBytes(payload), payload); }
// A packed repeated varint field of `count` values each at most `max_value`.
uint64_t Packed(uint64_t count, uint64_t max_value) {
  return count == 0 ? 0 : Delimited(Mul(count, VarintBytes(max_value)));
}
uint64_t MaxId(uint64_t count) { return count == 0 ? 0 : count - 1; }

}  // namespace

uint64_t VarintBytes(uint64_t value) {
  uint64_t bytes = 1;
  while (value >= 0x80) {
    value >>= 7;
    ++bytes;
  }
  return bytes;
}

uint64_t AllocateReplyBytes(uint32_t num_layers, uint64_t num_new_tokens, uint32_t pool_blocks,
                            uint32_t block_size) {
  const uint64_t max_slot = MaxId(uint64_t{pool_blocks} * block_size);
  // New blocks per layer: ceil((held + n) / bs) - ceil(held / bs) <= ceil(n / bs); one copy at
  // most (the shared tail).
  const uint64_t new_blocks = num_new_tokens / block_size + 1;
  const uint64_t copy = Delimited(2 * Scalar(kVarint32));
  const uint64_t layer = Sum({Scalar(kVarint32), Packed(new_blocks, MaxId(pool_blocks)),
                              Packed(num_new_tokens, max_slot), Scalar(kVarint32), copy});
  const uint64_t top = Delimited(kMaxSequenceIdLength) + Scalar(1) + 2 * Scalar(kVarint64);
  return Add(top, Mul(num_layers, Delimited(layer)));
}

uint64_t StepResultBytes(uint32_t num_layers, uint64_t num_new_tokens, uint32_t pool_blocks,
                         uint32_t block_size, bool slot_mapping) {
  const uint64_t max_slot = MaxId(uint64_t{pool_blocks} * block_size);
  const uint64_t new_blocks = num_new_tokens == 0 ? 0 : num_new_tokens / block_size + 1;
  const uint64_t copy = Delimited(2 * Scalar(kVarint32));
  const uint64_t layer =
      Sum({Scalar(kVarint32), Packed(new_blocks, MaxId(pool_blocks)),
           slot_mapping ? Packed(num_new_tokens, max_slot) : 0, Scalar(kVarint32), copy});
  const uint64_t result =
      Sum({2 * Scalar(kVarint32), Delimited(kMaxStepMessageBytes), Scalar(1), 3 * Scalar(kVarint64),
           num_new_tokens == 0 ? 0 : Mul(num_layers, Delimited(layer))});
  return Delimited(result);
}

uint64_t SequenceReplyBytes(absl::Span<const LayerCounts> layers, uint32_t pool_blocks) {
  uint64_t info =
      Sum({2 * Delimited(kMaxSequenceIdLength), Delimited(kMaxClientId), Scalar(kVarint64),
           2 * Delimited(kMaxShortString), Scalar(1), Packed(layers.size(), UINT32_MAX)});
  for (const LayerCounts& l : layers) {
    const uint64_t table =
        Sum({2 * Scalar(kVarint32), Packed(l.blocks, MaxId(pool_blocks)), Scalar(kVarint64),
             2 * Scalar(1), 2 * Scalar(kVarint32), Scalar(kVarint64)});
    info = Add(info, Delimited(table));
  }
  return Delimited(info);  // GetSequenceResponse.sequence / ForkResponse.child
}

uint64_t CompressReplyBytes(absl::Span<const LayerCounts> layers, uint32_t pool_blocks,
                            uint64_t num_positions) {
  uint64_t reply = 3 * Scalar(kVarint64) + 3 * Scalar(8);
  for (const LayerCounts& l : layers) {
    const uint64_t layer =
        Sum({Scalar(kVarint32), Scalar(8), 2 * Scalar(kVarint32),
             Packed(l.blocks, MaxId(pool_blocks)), Packed(l.positions, MaxId(num_positions)),
             Scalar(1), 2 * Scalar(kVarint32), Scalar(kVarint64), Scalar(8)});
    reply = Add(reply, Delimited(layer));
  }
  return reply;
}

uint64_t FetchReplyBytes(absl::Span<const LayerCounts> layers, uint32_t pool_blocks,
                         uint64_t num_positions) {
  uint64_t reply = 0;
  for (const LayerCounts& l : layers) {
    const uint64_t layer = Sum({2 * Scalar(kVarint32), Packed(l.blocks, MaxId(pool_blocks)),
                                Packed(l.positions, MaxId(num_positions)), Scalar(kVarint32)});
    reply = Add(reply, Delimited(layer));
  }
  return reply;
}

}  // namespace cachemgr::reply_size
