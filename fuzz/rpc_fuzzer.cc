// The fuzz target of one RPC, chosen at build time (fuzz/CMakeLists.txt builds one executable
// per RPC from this file with CACHEMGR_FUZZ_RPC set to its enumerator).
#include "fuzz/rpc_fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return cachemgr::fuzz::FuzzRpc(cachemgr::fuzz::Rpc::CACHEMGR_FUZZ_RPC, data, size);
}
