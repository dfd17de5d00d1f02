// RoPE on float32 rows in device memory: the CUDA twin of compress::RotateRows
// (cachemgr/compress/rope.h), used to un-rotate gathered keys before the codebook is built and
// to re-rotate reconstructed keys at their original positions.
//
// x is [rows, heads, head_dim]; row r rotates by the angles of table row angle_row[r] (cos and
// sin tables [positions, num_pairs], computed once on the host by ComputeRopeAngles). Only the
// first 2 * num_pairs dims of each head rotate. Pair i is (x[2i], x[2i+1]) for kInterleaved and
// (x[i], x[i + num_pairs]) for kHalfSplit; (a, b) -> (a cos - b s, a s + b cos) with
// s = sin (apply) or -sin (inverse), each product and sum rounded separately (no FMA), which is
// the CPU twin's float arithmetic, so results agree bit for bit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace cachemgr::kernels {

enum class RopePairing : uint8_t { kInterleaved = 0, kHalfSplit = 1 };

// Device pointers. An angle_row entry >= num_positions is skipped (its row left as is); check
// the host copy first. INVALID_ARGUMENT for 2 * num_pairs > head_dim, null pointers with work to
// do, or rows * heads beyond the grid limit.
absl::Status RotateRowsCuda(RopePairing pairing, uint32_t head_dim, uint32_t num_pairs,
                            const float* cos, const float* sin, uint32_t num_positions,
                            const uint32_t* angle_row, uint32_t rows, uint32_t heads, float* x,
                            bool inverse, cudaStream_t stream);

}  // namespace cachemgr::kernels
