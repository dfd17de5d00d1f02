// RowLinks: the row link kinds a daemon accepts (--row_links) and the links it keeps between
// transfers (row_link.h, docs/MULTINODE.md "Row links"). Making a link costs a rendezvous (an
// NCCL communicator takes hundreds of milliseconds), so a link that carried a transfer is kept
// for the next one between the same two pools:
//   - the sender keys its idle links by the peer's address and boot id, its own device and the
//     destination session (so the receiver's device is the same too); a peer that answers with
//     another boot id (it restarted) never sees its old links again, and they are closed at the
//     next Acquire;
//   - the receiver keys the links it joined by link id, the id the sender's header names when
//     it reuses one; it takes the link out while a transfer uses it, so two transfers never
//     share one;
//   - a link whose transfer failed is closed on both sides (never returned), a link unused for
//     `idle` is closed by the next call that looks (each Acquire, Take and Sweep), and Sweep
//     (the daemon calls it every second with its peers' view) closes the sender links of a peer
//     that is down, gone or restarted.
// Thread-safe.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachemgr/peers/row_link.h"

namespace cachemgr {

struct RowLinkCounters {
  uint64_t offered = 0;  // new links the sender offered
  uint64_t joined = 0;   // new links the receiver joined
  uint64_t reused = 0;   // transfers (either side) on a link that had carried one before
  uint64_t closed = 0;   // links closed: failed, idle, or their peer restarted
  uint64_t idle = 0;     // links kept now, both sides
};

class RowLinks {
 public:
  // `kinds` in order of preference (first the one offered when a peer accepts several); the
  // rows of one link message are as many as fit `chunk_bytes`.
  explicit RowLinks(std::vector<std::unique_ptr<RowLinkKind>> kinds,
                    uint64_t chunk_bytes = uint64_t{64} << 20,
                    absl::Duration idle = absl::Seconds(60));

  uint64_t chunk_bytes() const { return chunk_bytes_; }

  // The names of the kinds, in order (what Hello advertises).
  std::vector<std::string> names() const;
  RowLinkKind* Find(std::string_view name) const;

  // A sender's link for one transfer: an idle one (link set, offer empty) or a new offer
  // (pending set).
  struct SenderLease {
    std::string key;
    std::string address, boot_id;  // the peer's
    std::string kind;
    std::string link_id;
    std::unique_ptr<RowLink> link;
    std::unique_ptr<PendingRowLink> pending;
  };
  // The link for a transfer from this daemon's `device` (-1: host memory) to the peer at
  // `address` (boot id `boot_id`), destination session `destination`: the first of this
  // daemon's kinds the peer accepts (`peer_kinds`) that serves `device`. NOT_FOUND when none
  // does (the rows then take the stream); the offer's error otherwise.
  absl::StatusOr<SenderLease> Acquire(const std::string& address, const std::string& boot_id,
                                      const std::string& destination, int device,
                                      const std::vector<std::string>& peer_kinds);
  // After the transfer: an intact link (`ok`) is kept for the next one, any other closed.
  void Release(SenderLease lease, bool ok);
  // The receiver refused a new link for the lease key `key` (its pool's memory is out of the
  // kind's reach): Acquire answers NOT_FOUND for that key for `idle`.
  void Refuse(const std::string& key);

  // The receiver's side: the link `link_id` it joined before, taken out for one transfer.
  // NOT_FOUND when it has none by that id (never joined, closed, or idle too long).
  absl::StatusOr<std::unique_ptr<RowLink>> Take(const std::string& link_id);
  // After the transfer: an intact link (`ok`) is kept under `link_id`, any other closed.
  void Return(const std::string& link_id, std::unique_ptr<RowLink> link, bool ok, bool reused);
  // A link joined (counted).
  void CountJoined();

  // Closes idle and broken links, and the sender links of every peer not in `up` (address ->
  // boot id of the peers whose last probe succeeded) or up under another boot id.
  void Sweep(const std::map<std::string, std::string>& up);

  RowLinkCounters counters() const;

 private:
  struct Idle {
    std::string address, boot_id;  // the sender's peer (empty on the receiver's side)
    std::string link_id;
    std::string kind;
    std::unique_ptr<RowLink> link;
    absl::Time since;
  };
  // Closes what idled too long or broke, and the sender links `gone` (may be empty) names by
  // their peer's address and boot id.
  void SweepLocked(
      const std::function<bool(const std::string& address, const std::string& boot_id)>& gone)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::vector<std::unique_ptr<RowLinkKind>> kinds_;
  const uint64_t chunk_bytes_;
  const absl::Duration idle_;
  mutable absl::Mutex mu_;
  // Sender: by key (address, boot id, device, destination), several per key.
  std::multimap<std::string, Idle> sender_ ABSL_GUARDED_BY(mu_);
  // Receiver: by link id.
  std::map<std::string, Idle> receiver_ ABSL_GUARDED_BY(mu_);
  // Sender keys refused, until when.
  std::map<std::string, absl::Time> refused_ ABSL_GUARDED_BY(mu_);
  RowLinkCounters counters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace cachemgr
