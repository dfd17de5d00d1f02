// The fast path's wire format, shared by the daemon (service/fast_path_server.h) and the C++
// client; the Python client (client/python/cachemgr/fast_path.py) writes the same bytes.
//
// The fast path carries a session's bookkeeping calls (Heartbeat, Allocate, Free, Fork, Step)
// over a SOCK_STREAM Unix socket beside the gRPC socket, without gRPC's per-call machinery
// (docs/PERF.md, "The fast path"). The messages are the gRPC service's own: a request is the
// call's cachemgr.v1.<Method>Request, session token included, and the reply is its
// <Method>Response or the status the gRPC call would answer.
//
// A frame: the body's length as a 4-byte little-endian unsigned integer, then the body.
//   request body: one byte FastMethod, then the serialized request message;
//   reply body:   one byte status code (absl::StatusCode, the gRPC code; 0 = OK), then the
//                 serialized response message when OK, else the status message (UTF-8).
// A connection carries any number of calls; the daemon answers each request with one reply,
// in order. A request body over kMaxFastRequestBytes (or empty) is answered with an error and
// the connection is closed, since the stream cannot be resynchronised.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace cachemgr {

enum class FastMethod : uint8_t {
  kHeartbeat = 1,
  kAllocate = 2,
  kFree = 3,
  kFork = 4,
  kStep = 5,
};

inline constexpr size_t kFastFrameHeaderBytes = 4;
// Largest request body the daemon takes (a Step of 4,096 ops with 64-byte ids is ~400 KiB);
// clients send a larger request (ids of up to 256 bytes allow ~2 MiB) through gRPC instead.
inline constexpr uint32_t kMaxFastRequestBytes = uint32_t{1} << 20;

// "Allocate", ... (the gRPC method's name); nullopt for a byte that names no method.
std::optional<std::string_view> FastMethodName(uint8_t method);

// Appends a frame header announcing `body_bytes`.
void AppendFastFrameHeader(uint32_t body_bytes, std::string* out);

// Splits a byte stream into frame bodies. Not thread-safe.
class FastFrameReader {
 public:
  explicit FastFrameReader(uint32_t max_body_bytes) : max_body_bytes_(max_body_bytes) {}

  // Appends bytes received from the stream.
  void Append(std::string_view bytes);
  // The next complete body (valid until the next Append or Next), nullopt while it is
  // incomplete. RESOURCE_EXHAUSTED when the next frame announces a body over the limit and
  // INVALID_ARGUMENT for an empty one: the stream is unusable from there on.
  absl::StatusOr<std::optional<std::string_view>> Next();
  // Bytes received and not yet returned by Next().
  size_t buffered() const { return buffer_.size() - consumed_; }
  // Bytes still missing before the next body is complete (at least 1), once its header
  // arrived; otherwise the header bytes still missing.
  size_t missing() const;

 private:
  const uint32_t max_body_bytes_;
  std::string buffer_;
  size_t consumed_ = 0;
};

}  // namespace cachemgr
