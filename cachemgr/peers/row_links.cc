#include "cachemgr/peers/row_links.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cachemgr/util/secret_file.h"

namespace cachemgr {
namespace {

// 64 random bits as hex: a link's id (not a secret: joining a link takes its offer, which
// travels only in the authenticated stream).
std::string NewLinkId() { return RandomHex(8); }

// The sender key's parts are joined with a byte no address, boot id or token holds.
constexpr char kKeySeparator = '\n';

}  // namespace

RowLinks::RowLinks(std::vector<std::unique_ptr<RowLinkKind>> kinds, uint64_t chunk_bytes,
                   absl::Duration idle)
    : kinds_(std::move(kinds)), chunk_bytes_(chunk_bytes), idle_(idle) {}

std::vector<std::string> RowLinks::names() const {
  std::vector<std::string> names;
  for (const auto& k : kinds_) names.emplace_back(k->name());
  return names;
}

RowLinkKind* RowLinks::Find(std::string_view name) const {
  for (const auto& k : kinds_) {
    if (k->name() == name) return k.get();
  }
  return nullptr;
}

void RowLinks::SweepLocked(
    const std::function<bool(const std::string& address, const std::string& boot_id)>& gone) {
  const absl::Time now = absl::Now();
  for (auto it = sender_.begin(); it != sender_.end();) {
    const Idle& idle = it->second;
    if ((gone && gone(idle.address, idle.boot_id)) || now - idle.since > idle_ ||
        idle.link->broken()) {
      it = sender_.erase(it);
      ++counters_.closed;
    } else {
      ++it;
    }
  }
  for (auto it = receiver_.begin(); it != receiver_.end();) {
    if (now - it->second.since > idle_ || it->second.link->broken()) {
      it = receiver_.erase(it);
      ++counters_.closed;
    } else {
      ++it;
    }
  }
}

void RowLinks::Sweep(const std::map<std::string, std::string>& up) {
  absl::MutexLock lock(&mu_);
  SweepLocked([&up](const std::string& address, const std::string& boot_id) {
    auto it = up.find(address);
    return it == up.end() || it->second != boot_id;
  });
}

absl::StatusOr<RowLinks::SenderLease> RowLinks::Acquire(
    const std::string& address, const std::string& boot_id, const std::string& destination,
    int device, const std::vector<std::string>& peer_kinds) {
  SenderLease lease;
  lease.address = address;
  lease.boot_id = boot_id;
  lease.key =
      absl::StrCat(address, std::string(1, kKeySeparator), boot_id, std::string(1, kKeySeparator),
                   device, std::string(1, kKeySeparator), destination);
  RowLinkKind* kind = nullptr;
  for (const auto& k : kinds_) {
    if (k->Serves(device) &&
        std::find(peer_kinds.begin(), peer_kinds.end(), k->name()) != peer_kinds.end()) {
      kind = k.get();
      break;
    }
  }
  if (kind == nullptr) {
    return absl::NotFoundError("no row link kind both daemons accept serves the pool's memory");
  }
  lease.kind = std::string(kind->name());
  {
    absl::MutexLock lock(&mu_);
    SweepLocked([&](const std::string& a, const std::string& b) {
      return a == address && b != boot_id;  // the peer restarted
    });
    if (auto r = refused_.find(lease.key); r != refused_.end()) {
      if (absl::Now() < r->second) {
        return absl::NotFoundError("the peer refused a row link to this destination lately");
      }
      refused_.erase(r);
    }
    for (auto it = sender_.find(lease.key); it != sender_.end() && it->first == lease.key; ++it) {
      if (it->second.kind != lease.kind) continue;
      lease.link_id = it->second.link_id;
      lease.link = std::move(it->second.link);
      sender_.erase(it);
      ++counters_.reused;
      return lease;
    }
  }
  absl::StatusOr<std::unique_ptr<PendingRowLink>> pending = kind->Offer(device);
  if (!pending.ok()) return pending.status();
  lease.pending = *std::move(pending);
  lease.link_id = NewLinkId();
  absl::MutexLock lock(&mu_);
  ++counters_.offered;
  return lease;
}

void RowLinks::Release(SenderLease lease, bool ok) {
  absl::MutexLock lock(&mu_);
  if (lease.link == nullptr) return;  // never completed: nothing to keep or count
  if (!ok || lease.link->broken()) {
    lease.link->Abort();
    ++counters_.closed;
    return;
  }
  sender_.emplace(std::move(lease.key),
                  Idle{std::move(lease.address), std::move(lease.boot_id), std::move(lease.link_id),
                       std::move(lease.kind), std::move(lease.link), absl::Now()});
}

void RowLinks::Refuse(const std::string& key) {
  absl::MutexLock lock(&mu_);
  refused_[key] = absl::Now() + idle_;
}

absl::StatusOr<std::unique_ptr<RowLink>> RowLinks::Take(const std::string& link_id) {
  absl::MutexLock lock(&mu_);
  SweepLocked(nullptr);
  auto it = receiver_.find(link_id);
  if (it == receiver_.end()) {
    return absl::NotFoundError(absl::StrCat("no row link ", link_id, " is kept here"));
  }
  std::unique_ptr<RowLink> link = std::move(it->second.link);
  receiver_.erase(it);
  return link;
}

void RowLinks::Return(const std::string& link_id, std::unique_ptr<RowLink> link, bool ok,
                      bool reused) {
  absl::MutexLock lock(&mu_);
  if (reused) ++counters_.reused;
  if (link == nullptr) return;
  if (!ok || link->broken()) {
    link->Abort();
    ++counters_.closed;
    return;
  }
  receiver_[link_id] = Idle{"", "", link_id, "", std::move(link), absl::Now()};
}

void RowLinks::CountJoined() {
  absl::MutexLock lock(&mu_);
  ++counters_.joined;
}

RowLinkCounters RowLinks::counters() const {
  absl::MutexLock lock(&mu_);
  RowLinkCounters c = counters_;
  c.idle = sender_.size() + receiver_.size();
  return c;
}

}  // namespace cachemgr
