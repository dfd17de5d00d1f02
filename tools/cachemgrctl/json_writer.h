// A minimal streaming JSON writer for cachemgrctl's reports (stats.json): objects, arrays,
// strings, numbers, booleans. Floats print with the fewest digits that read back to the same
// value (so 0.98f prints as 0.98, not 0.9800000190734863); non-finite numbers print as null.
// Misuse (a value without a key inside an object, unbalanced End*) is a programming error and
// is not diagnosed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cachemgr::ctl {

class JsonWriter {
 public:
  JsonWriter& BeginObject();
  JsonWriter& EndObject();
  JsonWriter& BeginArray();
  JsonWriter& EndArray();
  JsonWriter& Key(const std::string& key);
  JsonWriter& String(const std::string& value);
  JsonWriter& Bool(bool value);
  JsonWriter& Double(double value);
  JsonWriter& Float(float value);
  JsonWriter& Uint(uint64_t value);

  // The document, indented by two spaces per level, with a trailing newline.
  std::string str() const { return out_ + "\n"; }

 private:
  void BeforeValue();
  void Newline();

  std::string out_;
  std::vector<bool> has_items_;  // per open container
  bool after_key_ = false;
};

}  // namespace cachemgr::ctl
