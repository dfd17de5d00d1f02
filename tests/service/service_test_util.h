// Shared helpers for the black-box service tests: raw gRPC stubs to a running daemon (to send
// requests the typed client would never build) and small parsing helpers.
#pragma once

#include <sys/stat.h>

#include <fstream>
#include <memory>
#include <string>

#include "cachemgr/v1/cachemgr.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace cachemgr::testing {

// Adds the operator credential the daemon at `socket_path` wrote beside its socket (the test
// process runs as the daemon's user, so it may read it).
inline void AddOperatorCredential(grpc::ClientContext& ctx, const std::string& socket_path) {
  std::ifstream in(socket_path + ".operator");
  std::string token;
  std::getline(in, token);
  ctx.AddMetadata("x-cachemgr-operator", token);
}

inline std::unique_ptr<v1::CacheManager::Stub> RawStub(const std::string& socket_path) {
  return v1::CacheManager::NewStub(
      grpc::CreateChannel("unix:" + socket_path, grpc::InsecureChannelCredentials()));
}

inline v1::ModelSpec StoriesModel(const std::string& name = "stories260K") {
  v1::ModelSpec m;
  m.set_name(name);
  m.set_num_layers(5);
  m.set_num_q_heads(8);
  m.set_num_kv_heads(4);
  m.set_head_dim(8);
  m.set_dtype(v1::DTYPE_FP32);
  m.set_block_size(16);
  m.set_layout(v1::CACHE_LAYOUT_FLASH_ATTN);
  m.mutable_rope()->set_style(v1::ROPE_STYLE_INTERLEAVED);
  m.mutable_rope()->set_theta(10000);
  return m;
}

// Used blocks summed over every layer of every pool.
inline uint64_t UsedBlocks(v1::CacheManager::Stub& stub) {
  grpc::ClientContext ctx;
  v1::StatsRequest req;
  v1::StatsResponse resp;
  if (!stub.Stats(&ctx, req, &resp).ok()) return ~uint64_t{0};
  uint64_t used = 0;
  for (const auto& p : resp.pools()) {
    for (const auto& l : p.layers()) used += l.used_blocks();
  }
  return used;
}

// Free + used + quarantined == capacity on every layer of every pool, and the memory charged
// stays within the budget.
inline bool AccountingBalances(v1::CacheManager::Stub& stub) {
  grpc::ClientContext ctx;
  v1::StatsRequest req;
  v1::StatsResponse resp;
  if (!stub.Stats(&ctx, req, &resp).ok()) return false;
  if (resp.memory_used_bytes() > resp.memory_budget_bytes()) return false;
  for (const auto& p : resp.pools()) {
    for (const auto& l : p.layers()) {
      if (l.free_blocks() + l.used_blocks() + l.quarantined_blocks() != l.capacity_blocks()) {
        return false;
      }
    }
  }
  return true;
}

inline mode_t FileMode(const std::string& path) {
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0) return 0;
  return st.st_mode & 0777;
}

}  // namespace cachemgr::testing
