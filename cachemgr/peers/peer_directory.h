// PeerDirectory: the daemon's view of its peers (--peers). A thread resolves the entries and
// probes every peer address with one Peer.Hello per round, all in flight at once, each within
// a deadline; it keeps one channel per address and drops the channel (and the peer) once its
// entry no longer resolves to the address. Snapshot() and the metrics read what the last
// round saw. Transfers between daemons (docs/MULTINODE.md) reach peers through Route().
//
// Thread-safe. The destructor stops the thread (within one probe deadline).
#pragma once

#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachemgr/peers/peer_address.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/security/credentials.h"
#include "prometheus/collectable.h"

namespace cachemgr {

enum class PeerState { kUnknown, kUp, kDown, kSelf };

const char* PeerStateName(PeerState state);  // "unknown", "up", "down", "self"

struct PeerSnapshot {
  std::string address;  // "host:port"
  std::string source;   // the --peers entry
  PeerState state = PeerState::kUnknown;
  std::string boot_id, version, node_name;  // from its last answer
  std::vector<std::string> row_links;       // the row link kinds it joins (its last answer)
  absl::Time last_seen = absl::InfinitePast();
  absl::Duration rtt = absl::ZeroDuration();
  uint64_t probes_ok = 0, probes_failed = 0;
  std::string last_error;  // the last failed probe; empty once one succeeds
};

struct PeerDirectoryOptions {
  std::vector<PeerSource> sources;
  // Who this daemon is (sent in every Hello; an answer with the same boot id is this daemon).
  std::string boot_id, node_name;
  absl::Duration probe_interval = absl::Seconds(2);
  absl::Duration probe_deadline = absl::Seconds(1);
  // How peers are reached: the credentials of their TCP listeners, the bearer token every
  // call sends (empty: none, mutual TLS alone), and the TLS name their certificates carry
  // (empty: the address's host).
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  std::string bearer_token;
  std::string tls_server_name;
};

// A peer to call: its address, what its last answer said, and the channel to it.
struct PeerRoute {
  std::string address;
  std::string boot_id, node_name;
  std::vector<std::string> row_links;
  std::shared_ptr<grpc::Channel> channel;
};

class PeerDirectory {
 public:
  // Starts probing at once (no thread when there are no sources).
  explicit PeerDirectory(PeerDirectoryOptions options);
  ~PeerDirectory();
  PeerDirectory(const PeerDirectory&) = delete;
  PeerDirectory& operator=(const PeerDirectory&) = delete;

  const std::string& boot_id() const { return options_.boot_id; }
  const std::string& node_name() const { return options_.node_name; }

  // Every known peer address, sorted by address.
  std::vector<PeerSnapshot> Snapshot() const;

  // The peer `peer` names: its address ("host:port") or its node name. NOT_FOUND when no peer
  // has that address or node name (or two have the node name: FAILED_PRECONDITION), or it is
  // this daemon; UNAVAILABLE when its last probe failed or it was not probed yet.
  absl::StatusOr<PeerRoute> Route(const std::string& peer) const;

  // Adds what every call to a peer carries (the cluster's bearer token, if any).
  void Authenticate(grpc::ClientContext* context) const;

  // Prometheus gauges and counters of the peers (docs/OPERATIONS.md), read at scrape time.
  std::shared_ptr<prometheus::Collectable> collectable() const;

 private:
  struct Peer {
    PeerSnapshot snapshot;
    std::shared_ptr<grpc::Channel> channel;
  };
  class Metrics;

  void Run();
  // Resolves the sources into the current peer set (new channels, gone peers dropped).
  void Refresh();
  // One Hello to every peer, in parallel; returns when all have answered or timed out.
  void ProbeAll();

  const PeerDirectoryOptions options_;
  std::shared_ptr<Metrics> metrics_;
  mutable absl::Mutex mu_;
  std::map<std::string, Peer> peers_ ABSL_GUARDED_BY(mu_);  // by address
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Entries whose last resolution failed (the prober thread's own: logged on change only).
  std::set<std::string> unresolvable_;
  std::thread thread_;
};

}  // namespace cachemgr
