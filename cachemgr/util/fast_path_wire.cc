#include "cachemgr/util/fast_path_wire.h"

#include "absl/strings/str_cat.h"

namespace cachemgr {
namespace {

uint32_t LoadLittleEndian32(const char* p) {
  const auto* b = reinterpret_cast<const unsigned char*>(p);
  return uint32_t{b[0]} | uint32_t{b[1]} << 8 | uint32_t{b[2]} << 16 | uint32_t{b[3]} << 24;
}

}  // namespace

std::optional<std::string_view> FastMethodName(uint8_t method) {
  switch (static_cast<FastMethod>(method)) {
    case FastMethod::kHeartbeat:
      return "Heartbeat";
    case FastMethod::kAllocate:
      return "Allocate";
    case FastMethod::kFree:
      return "Free";
    case FastMethod::kFork:
      return "Fork";
    case FastMethod::kStep:
      return "Step";
  }
  return std::nullopt;
}

void AppendFastFrameHeader(uint32_t body_bytes, std::string* out) {
  const char header[kFastFrameHeaderBytes] = {
      static_cast<char>(body_bytes & 0xff), static_cast<char>((body_bytes >> 8) & 0xff),
      static_cast<char>((body_bytes >> 16) & 0xff), static_cast<char>((body_bytes >> 24) & 0xff)};
  out->append(header, kFastFrameHeaderBytes);
}

void FastFrameReader::Append(std::string_view bytes) {
  if (consumed_ > 0 && consumed_ == buffer_.size()) {
    buffer_.clear();
    consumed_ = 0;
  } else if (consumed_ >= (size_t{64} << 10) && consumed_ * 2 >= buffer_.size()) {
    buffer_.erase(0, consumed_);  // reclaim the front once it is most of the buffer
    consumed_ = 0;
  }
  buffer_.append(bytes);
}

absl::StatusOr<std::optional<std::string_view>> FastFrameReader::Next() {
  if (buffered() < kFastFrameHeaderBytes) return std::nullopt;
  const uint32_t body = LoadLittleEndian32(buffer_.data() + consumed_);
  if (body == 0) return absl::InvalidArgumentError("fast path frame with an empty body");
  if (body > max_body_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "fast path frame of ", body, " bytes is over the limit of ", max_body_bytes_, " bytes"));
  }
  if (buffered() - kFastFrameHeaderBytes < body) return std::nullopt;
  const std::string_view out(buffer_.data() + consumed_ + kFastFrameHeaderBytes, body);
  consumed_ += kFastFrameHeaderBytes + body;
  return out;
}

size_t FastFrameReader::missing() const {
  if (buffered() < kFastFrameHeaderBytes) return kFastFrameHeaderBytes - buffered();
  const size_t body = LoadLittleEndian32(buffer_.data() + consumed_);
  const size_t have = buffered() - kFastFrameHeaderBytes;
  return have < body ? body - have : 1;
}

}  // namespace cachemgr
