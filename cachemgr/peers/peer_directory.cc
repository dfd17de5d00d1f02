#include "cachemgr/peers/peer_directory.h"

#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cachemgr/util/log.h"
#include "cachemgr/util/quote.h"
#include "cachemgr/v1/cachemgr.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/support/channel_arguments.h"
#include "prometheus/client_metric.h"
#include "prometheus/metric_family.h"

namespace cachemgr {

const char* PeerStateName(PeerState state) {
  switch (state) {
    case PeerState::kUnknown:
      return "unknown";
    case PeerState::kUp:
      return "up";
    case PeerState::kDown:
      return "down";
    case PeerState::kSelf:
      return "self";
  }
  return "unknown";
}

class PeerDirectory::Metrics final : public prometheus::Collectable {
 public:
  explicit Metrics(const PeerDirectory* directory) : directory_(directory) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    using prometheus::ClientMetric;
    using prometheus::MetricFamily;
    using prometheus::MetricType;
    const std::vector<PeerSnapshot> peers = directory_->Snapshot();
    MetricFamily up{"cachemgr_peer_up",
                    "1 if the last probe (Peer.Hello) of a peer succeeded, else 0; this daemon's "
                    "own address (a DNS entry resolving to it) is left out.",
                    MetricType::Gauge,
                    {}};
    MetricFamily rtt{"cachemgr_peer_rtt_seconds",
                     "Round trip of the last successful probe of a peer.",
                     MetricType::Gauge,
                     {}};
    MetricFamily probes{"cachemgr_peer_probes_total",
                        "Probes of a peer, by result (ok, failed).",
                        MetricType::Counter,
                        {}};
    for (const PeerSnapshot& p : peers) {
      if (p.state == PeerState::kSelf) continue;
      ClientMetric m;
      m.label = {{"peer", p.address}, {"source", p.source}};
      m.gauge.value = p.state == PeerState::kUp ? 1 : 0;
      up.metric.push_back(m);
      m.gauge.value = absl::ToDoubleSeconds(p.rtt);
      rtt.metric.push_back(m);
      for (const auto& [result, count] :
           {std::pair{"ok", p.probes_ok}, std::pair{"failed", p.probes_failed}}) {
        ClientMetric c;
        c.label = {{"peer", p.address}, {"result", result}};
        c.counter.value = static_cast<double>(count);
        probes.metric.push_back(std::move(c));
      }
    }
    return {std::move(up), std::move(rtt), std::move(probes)};
  }

 private:
  const PeerDirectory* const directory_;
};

PeerDirectory::PeerDirectory(PeerDirectoryOptions options)
    : options_(std::move(options)), metrics_(std::make_shared<Metrics>(this)) {
  if (!options_.sources.empty()) thread_ = std::thread([this] { Run(); });
}

PeerDirectory::~PeerDirectory() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<prometheus::Collectable> PeerDirectory::collectable() const { return metrics_; }

std::vector<PeerSnapshot> PeerDirectory::Snapshot() const {
  absl::MutexLock lock(&mu_);
  std::vector<PeerSnapshot> out;
  out.reserve(peers_.size());
  for (const auto& [address, peer] : peers_) out.push_back(peer.snapshot);
  return out;
}

absl::StatusOr<PeerRoute> PeerDirectory::Route(const std::string& peer) const {
  absl::MutexLock lock(&mu_);
  const Peer* found = nullptr;
  if (auto it = peers_.find(peer); it != peers_.end()) {
    found = &it->second;
  } else {
    for (const auto& [address, p] : peers_) {
      if (p.snapshot.node_name.empty() || p.snapshot.node_name != peer ||
          p.snapshot.state == PeerState::kSelf) {
        continue;
      }
      if (found != nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat("peer: node name ", QuoteForMessage(peer), " is answered at both ",
                         found->snapshot.address, " and ", address, "; name the address"));
      }
      found = &p;
    }
  }
  if (found == nullptr || found->snapshot.state == PeerState::kSelf) {
    return absl::NotFoundError(absl::StrCat(
        "peer: ", QuoteForMessage(peer),
        " is neither the address nor the node name of a peer of this daemon (cachemgrctl peers)"));
  }
  const PeerSnapshot& s = found->snapshot;
  if (s.state != PeerState::kUp) {
    return absl::UnavailableError(
        absl::StrCat("peer ", s.address, " is ", PeerStateName(s.state),
                     s.last_error.empty() ? "" : absl::StrCat(": ", s.last_error)));
  }
  return PeerRoute{s.address, s.boot_id, s.node_name, s.row_links, found->channel};
}

void PeerDirectory::Authenticate(grpc::ClientContext* context) const {
  if (!options_.bearer_token.empty()) {
    context->AddMetadata("authorization", absl::StrCat("Bearer ", options_.bearer_token));
  }
}

void PeerDirectory::Run() {
  while (true) {
    Refresh();
    ProbeAll();
    absl::MutexLock lock(&mu_);
    if (mu_.AwaitWithTimeout(absl::Condition(&stop_), options_.probe_interval)) return;
  }
}

void PeerDirectory::Refresh() {
  // Resolution happens outside the lock (DNS may take a while).
  std::map<std::string, std::string> wanted;  // address -> source entry
  std::set<std::string> unresolved;           // sources whose addresses stay as they were
  for (const PeerSource& source : options_.sources) {
    absl::StatusOr<std::vector<std::string>> addresses = ResolvePeerSource(source);
    if (!addresses.ok()) {
      unresolved.insert(source.entry);
      if (unresolvable_.insert(source.entry).second) {  // logged once until it resolves again
        Log(LogLevel::kWarning, "peer entry does not resolve; its peers stay as they were",
            {{"entry", source.entry}, {"error", addresses.status().ToString()}});
      }
      continue;
    }
    if (unresolvable_.erase(source.entry) != 0) {
      Log(LogLevel::kInfo, "peer entry resolves again",
          {{"entry", source.entry}, {"addresses", static_cast<uint64_t>(addresses->size())}});
    }
    for (std::string& address : *addresses) wanted.emplace(std::move(address), source.entry);
  }
  absl::MutexLock lock(&mu_);
  for (auto it = peers_.begin(); it != peers_.end();) {
    if (wanted.count(it->first) == 0 && unresolved.count(it->second.snapshot.source) == 0) {
      Log(LogLevel::kInfo, "peer gone from its entry; dropped",
          {{"peer", it->first}, {"entry", it->second.snapshot.source}});
      it = peers_.erase(it);  // the channel closes with its last user
    } else {
      ++it;
    }
  }
  for (const auto& [address, source] : wanted) {
    if (peers_.count(address) != 0) continue;
    grpc::ChannelArguments args;
    if (!options_.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(options_.tls_server_name);
    }
    Peer peer;
    peer.snapshot.address = address;
    peer.snapshot.source = source;
    peer.channel = grpc::CreateCustomChannel(address, options_.credentials, args);
    peers_.emplace(address, std::move(peer));
  }
}

void PeerDirectory::ProbeAll() {
  struct Probe {
    std::string address;
    grpc::ClientContext context;
    v1::HelloRequest request;
    v1::HelloResponse response;
    std::unique_ptr<v1::Peer::Stub> stub;
    absl::Time start;
    grpc::Status status;
    absl::Duration rtt;
  };
  std::vector<std::unique_ptr<Probe>> probes;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [address, peer] : peers_) {
      auto probe = std::make_unique<Probe>();
      probe->address = address;
      probe->stub = v1::Peer::NewStub(peer.channel);
      probes.push_back(std::move(probe));
    }
  }
  absl::Mutex done_mu;
  size_t pending = probes.size();
  for (auto& probe : probes) {
    Probe* p = probe.get();
    p->request.set_boot_id(options_.boot_id);
    p->request.set_node_name(options_.node_name);
    p->context.set_deadline(absl::ToChronoTime(absl::Now() + options_.probe_deadline));
    Authenticate(&p->context);
    p->start = absl::Now();
    p->stub->async()->Hello(&p->context, &p->request, &p->response,
                            [p, &done_mu, &pending](grpc::Status status) {
                              p->rtt = absl::Now() - p->start;
                              p->status = std::move(status);
                              absl::MutexLock lock(&done_mu);
                              --pending;
                            });
  }
  {
    absl::MutexLock lock(&done_mu);
    done_mu.Await(absl::Condition(
        +[](size_t* n) { return *n == 0; }, &pending));
  }
  absl::MutexLock lock(&mu_);
  for (const auto& probe : probes) {
    auto it = peers_.find(probe->address);
    if (it == peers_.end()) continue;
    PeerSnapshot& s = it->second.snapshot;
    const PeerState before = s.state;
    if (probe->status.ok()) {
      ++s.probes_ok;
      s.boot_id = probe->response.boot_id();
      s.version = probe->response.version();
      s.node_name = probe->response.node_name();
      s.row_links.assign(probe->response.row_links().begin(), probe->response.row_links().end());
      s.last_seen = absl::Now();
      s.rtt = probe->rtt;
      s.last_error.clear();
      s.state = s.boot_id == options_.boot_id ? PeerState::kSelf : PeerState::kUp;
    } else {
      ++s.probes_failed;
      s.state = PeerState::kDown;
      s.last_error = absl::StrCat(
          absl::StatusCodeToString(static_cast<absl::StatusCode>(probe->status.error_code())), ": ",
          probe->status.error_message());
    }
    if (s.state != before && s.state != PeerState::kSelf) {
      Log(s.state == PeerState::kUp ? LogLevel::kInfo : LogLevel::kWarning, "peer state changed",
          {{"peer", s.address},
           {"state", PeerStateName(s.state)},
           {"node", s.node_name},
           {"boot_id", s.boot_id},
           {"error", s.last_error}});
    }
  }
}

}  // namespace cachemgr
