// Where the engine tests find the real checkpoints (../shared/models beside the checkout).
#pragma once

#include <string>

namespace cachemgr::engine::testing {

inline std::string SharedDir() { return CACHEMGR_SHARED_DIR; }
inline std::string StoriesBin() { return SharedDir() + "/models/stories260K.bin"; }
inline std::string StoriesGguf() { return SharedDir() + "/models/stories260K.gguf"; }
inline std::string Tok512() { return SharedDir() + "/models/tok512.bin"; }
inline std::string GreedyReference() {
  return SharedDir() + "/models/stories260K_greedy_reference.txt";
}

}  // namespace cachemgr::engine::testing
