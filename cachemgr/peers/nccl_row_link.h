// The "nccl" row link (row_link.h, CUDA builds): a two-rank NCCL communicator between a CUDA
// device of the sender (rank 0) and one of the receiver (rank 1), made non-blocking so that
// joining, sending and receiving all return by their deadline (the communicator is aborted when
// a wait runs out or stops). The offer is NCCL's unique id; the rows go from the source pool's
// device to the destination's (PoolMemory::PackRowsOnDevice / UnpackRowsOnDevice) on the link's
// own stream, never through host memory. NCCL refuses two ranks on one GPU, so two pools on the
// same device do not link (Serves is per device; the transfer then takes the stream).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "cachemgr/peers/row_link.h"

namespace cachemgr {

// One CUDA device of this daemon: its ordinal and UUID ("GPU-...").
struct NcclDevice {
  int ordinal = 0;
  std::string uuid;
};

// Links of kind "nccl" from this daemon's CUDA devices. The offer is NCCL's unique id followed
// by the sender device's UUID, so a receiver on the same GPU refuses it (CanJoin) and the rows
// take the stream.
std::unique_ptr<RowLinkKind> NewNcclRowLinkKind(std::vector<NcclDevice> devices);

}  // namespace cachemgr
