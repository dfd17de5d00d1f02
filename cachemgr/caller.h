// Caller: who makes a CacheManager call and when it arrived. The service builds one per RPC from
// the request's session token, the transport's view of the peer and the call's arrival time;
// CacheManager authorizes with it and judges the caller's lease by `arrival`, so a call that
// waited behind a slow one is not blamed for the wait.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <utility>

#include "absl/time/time.h"

namespace cachemgr {

// The kernel's view of a Unix-socket peer (SO_PEERCRED), taken when its connection was accepted.
struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

struct Caller {
  Caller() = default;
  // A session's call, arriving now. Implicit on purpose: most calls are just a token.
  Caller(std::string token) : session_token(std::move(token)) {}  // NOLINT(runtime/explicit)
  Caller(const char* token) : session_token(token) {}             // NOLINT(runtime/explicit)

  // The session the call acts for; empty for calls made without one (operator and inspection
  // calls).
  std::string session_token;
  // When the call arrived at the daemon; InfinitePast means "now" (the manager's clock).
  absl::Time arrival = absl::InfinitePast();
  // Unix-socket peers: their credentials; unset for TCP peers and in-process callers.
  std::optional<PeerCredentials> peer;
  // The caller proved operator rights (the operator credential).
  bool operator_credential = false;
  // A peer daemon delivering a transfer (Peer.ReceiveSequence) to the session its token names:
  // the token alone names the session, whoever attached it (the peer was authenticated as a
  // daemon of the cluster, and the token is the receiving client's secret).
  bool peer_daemon = false;

  bool has_session() const { return !session_token.empty(); }
  // Who owns what this caller creates: the peer's uid; nullopt for TCP and in-process callers
  // (which form one owner of their own).
  std::optional<uid_t> owner() const {
    return peer.has_value() ? std::optional<uid_t>(peer->uid) : std::nullopt;
  }
};

}  // namespace cachemgr
