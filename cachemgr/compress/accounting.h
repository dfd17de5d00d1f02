// Byte accounting of compressed KV: the honest bytes held, and the paper's eq. 15 ratio.
//
// Honest bytes (what CompressionStats documents):
//   full KV:        num_layers * l * num_kv_heads * head_dim * 2 * elem_bytes
//   plain layer:    num_kv_heads * kept_per_head * head_dim * 2 * elem_bytes
//   codebook layer: for K and for V, per codebook part (one per layer, or one per KV head):
//                   entries * head_dim * elem_bytes + vectors * (ref_bytes + elem_bytes),
//                   ref_bytes = 2 when the part has < 65536 entries, else 4; the magnitude is
//                   stored at elem_bytes.
//
// Eq. 15 (the paper's number; printed garbled), per layer lambda:
//   r1 = sum_j (|K_r^j| + |V_r^j|) / sum_j (|K^j| + |V^j|) = kept_per_head / l;
//   r2 = (|C_K| + |C_V|) / (kept K vectors + kept V vectors) for a codebook layer, else 1;
//   r3 = (d_h + (index_bits + magnitude_bits) / elem_bits) / d_h for a codebook layer, else 1,
//        with index_bits = 8 * ref_bytes (of the largest codebook part of the layer),
//        magnitude_bits = elem_bits = 8 * elem_bytes.
//   r^lambda = r1 * r2 * r3, and the sequence's ratio is the mean over layers.
// Why this r3: the paper says r3 "serves as the dtype convert ratio since we store int type
// index and float type magnitude for each key and value"; the printed "d_h + int_bit/(key_bit
// + 1)" reads as d_h + int_bit/key_bit + 1, i.e. the index expressed in elements plus one element
// for the magnitude, charged per codebook entry as the paper's formula does. It therefore
// differs from the honest ratio, which charges index + magnitude per kept vector.
#pragma once

#include <cstdint>

#include "cachemgr/compress/compress.h"

namespace cachemgr::compress {

uint64_t FullKvBytes(const ModelShape& shape, uint32_t num_tokens);

uint64_t PlainLayerBytes(const ModelShape& shape, uint32_t kept_per_head);

// 2 bytes for a codebook of fewer than 65536 entries, else 4.
uint32_t CodebookRefBytes(uint32_t num_entries);

// One codebook part: entries * head_dim * elem_bytes + vectors * (ref_bytes + elem_bytes).
uint64_t CodebookPartBytes(uint32_t num_entries, uint64_t num_vectors, uint32_t head_dim,
                           uint32_t elem_bytes);

// The honest bytes of `layer` as stored: plain when it has no codebooks, else its key and value
// codebooks part by part (LayerResult::key_entry_offsets / value_entry_offsets).
uint64_t LayerBytes(const ModelShape& shape, const LayerResult& layer);

// r^lambda of eq. 15 for `layer` of a sequence of num_tokens tokens (see above).
double LayerEq15Ratio(const ModelShape& shape, const LayerResult& layer, uint32_t num_tokens);

}  // namespace cachemgr::compress
