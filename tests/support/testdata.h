// Where the tests find the fixtures carried in the repository (testdata/, described with their
// sources, licences and checksums in testdata/README.md): the stories260K checkpoint and its
// tokenizer, and excerpts of the evaluation texts. Needs CACHEMGR_SOURCE_DIR, which
// tests/CMakeLists.txt defines for every test.
#pragma once

#include <string>

namespace cachemgr::testing {

inline std::string TestdataDir() { return std::string(CACHEMGR_SOURCE_DIR) + "/testdata"; }
// The texts, laid out as cachemgr-eval's --data_dir expects (tinystories/, brown/, ...).
inline std::string TextDir() { return TestdataDir() + "/text"; }
inline std::string StoriesBin() { return TestdataDir() + "/models/stories260K.bin"; }
inline std::string StoriesGguf() { return TestdataDir() + "/models/stories260K.gguf"; }
inline std::string Tok512() { return TestdataDir() + "/models/tok512.bin"; }
inline std::string GreedyReference() {
  return TestdataDir() + "/models/stories260K_greedy_reference.txt";
}

}  // namespace cachemgr::testing
