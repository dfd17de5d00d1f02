// The socket row link (peers/socket_row_link.h) on loopback, and the link cache (row_links.h):
// bytes cross intact both ways, only who presents the offer's nonce joins, every wait ends at its
// deadline, stop or Abort (and breaks the link), bad offers are named, and links are reused,
// closed and refused as the cache promises.
#include "cachemgr/peers/socket_row_link.h"

#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "cachemgr/peers/row_links.h"
#include "cachemgr/util/unique_fd.h"

namespace cachemgr {
namespace {

LinkWait Within(absl::Duration d) { return LinkWait{absl::Now() + d, {}}; }

std::vector<std::byte> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> bytes(n);
  for (auto& b : bytes) b = static_cast<std::byte>(rng());
  return bytes;
}

// A joined pair: the sender's end (from Complete) and the receiver's (from Join).
struct Pair {
  std::unique_ptr<RowLink> sender, receiver;
};

Pair Connect(RowLinkKind& kind) {
  auto pending = kind.Offer(-1);
  REQUIRE(pending.ok());
  absl::StatusOr<std::unique_ptr<RowLink>> joined;
  std::thread joiner(
      [&] { joined = kind.Join((*pending)->offer(), -1, Within(absl::Seconds(10))); });
  auto completed = (*pending)->Complete(Within(absl::Seconds(10)));
  joiner.join();
  REQUIRE(completed.ok());
  REQUIRE(joined.ok());
  return Pair{*std::move(completed), *std::move(joined)};
}

TEST_CASE("socket row link: megabytes cross intact both ways", "[peers]") {
  auto kind = NewSocketRowLinkKind("127.0.0.1");
  CHECK(kind->name() == "socket");
  CHECK(kind->Serves(-1));
  Pair p = Connect(*kind);
  CHECK(p.sender->device() == -1);
  const std::vector<std::byte> out = RandomBytes(3 << 20, 1);
  auto in = p.receiver->NewBuffer(out.size());
  REQUIRE(in.ok());
  // Catch's assertions stay on this thread (it is not thread-safe).
  absl::Status sent;
  std::thread sender(
      [&] { sent = p.sender->Send(out.data(), out.size(), Within(absl::Seconds(20))); });
  const absl::Status received =
      p.receiver->Recv((*in)->data(), out.size(), Within(absl::Seconds(20)));
  sender.join();
  REQUIRE(sent.ok());
  REQUIRE(received.ok());
  CHECK(std::memcmp((*in)->data(), out.data(), out.size()) == 0);
  // And back, on the same link.
  const std::vector<std::byte> back = RandomBytes(1000, 2);
  std::vector<std::byte> got(back.size());
  REQUIRE(p.receiver->Send(back.data(), back.size(), Within(absl::Seconds(5))).ok());
  REQUIRE(p.sender->Recv(got.data(), got.size(), Within(absl::Seconds(5))).ok());
  CHECK(got == back);
  CHECK_FALSE(p.sender->broken());
  CHECK_FALSE(p.receiver->broken());
}

TEST_CASE("socket row link: only the offer's nonce joins", "[peers]") {
  auto kind = NewSocketRowLinkKind("127.0.0.1");
  auto pending = kind->Offer(-1);
  REQUIRE(pending.ok());
  const std::vector<std::string> parts = absl::StrSplit((*pending)->offer(), ' ');
  REQUIRE(parts.size() == 3);
  CHECK(parts[0] == "127.0.0.1");
  CHECK(parts[2].size() == 32);
  // A stranger with another nonce connects: it is turned away and the wait goes on.
  const std::string forged = absl::StrCat(parts[0], " ", parts[1], " ", std::string(32, 'f'));
  absl::StatusOr<std::unique_ptr<RowLink>> stranger;
  std::thread intruder([&] { stranger = kind->Join(forged, -1, Within(absl::Seconds(5))); });
  const absl::Time start = absl::Now();
  auto completed = (*pending)->Complete(Within(absl::Milliseconds(500)));
  intruder.join();
  CHECK(completed.status().code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(absl::Now() - start < absl::Seconds(3));
  // The stranger's link goes nowhere: the sender closed it.
  if (stranger.ok()) {
    std::byte b;
    CHECK_FALSE((*stranger)->Recv(&b, 1, Within(absl::Seconds(5))).ok());
  }

  // A stranger that connects and stays silent holds the offer up for a second at most: the
  // rightful joiner after it gets in.
  auto second = kind->Offer(-1);
  REQUIRE(second.ok());
  const std::vector<std::string> p2 = absl::StrSplit((*second)->offer(), ' ');
  absl::StatusOr<std::unique_ptr<RowLink>> rightful;
  UniqueFd silent(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(std::stoi(p2[1])));
  REQUIRE(::connect(silent.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  std::thread joiner([&] {
    absl::SleepFor(absl::Milliseconds(100));  // behind the silent one
    rightful = kind->Join((*second)->offer(), -1, Within(absl::Seconds(5)));
  });
  const absl::Time began = absl::Now();
  auto done = (*second)->Complete(Within(absl::Seconds(5)));
  joiner.join();
  REQUIRE(done.ok());
  CHECK(absl::Now() - began < absl::Seconds(3));
  REQUIRE(rightful.ok());
  const std::byte one{42};
  std::byte got{0};
  REQUIRE((*rightful)->Send(&one, 1, Within(absl::Seconds(5))).ok());
  REQUIRE((*done)->Recv(&got, 1, Within(absl::Seconds(5))).ok());
  CHECK(got == one);
}

TEST_CASE("socket row link: waits end at the deadline, the stop, or Abort", "[peers]") {
  auto kind = NewSocketRowLinkKind("127.0.0.1");
  SECTION("deadline") {
    Pair p = Connect(*kind);
    std::byte b[16];
    const absl::Time start = absl::Now();
    const absl::Status s = p.receiver->Recv(b, sizeof(b), Within(absl::Milliseconds(200)));
    CHECK(s.code() == absl::StatusCode::kDeadlineExceeded);
    CHECK(absl::Now() - start < absl::Seconds(2));
    CHECK(p.receiver->broken());
    // The peer sees the link close.
    CHECK(p.sender->Recv(b, 1, Within(absl::Seconds(5))).code() == absl::StatusCode::kUnavailable);
  }
  SECTION("stop") {
    Pair p = Connect(*kind);
    std::atomic<bool> stop{false};
    std::thread stopper([&] {
      absl::SleepFor(absl::Milliseconds(100));
      stop.store(true);
    });
    std::byte b[16];
    const absl::Status s = p.receiver->Recv(
        b, sizeof(b), LinkWait{absl::Now() + absl::Seconds(30), [&] { return stop.load(); }});
    stopper.join();
    CHECK(s.code() == absl::StatusCode::kAborted);
    CHECK(p.receiver->broken());
  }
  SECTION("Abort from another thread") {
    Pair p = Connect(*kind);
    std::thread aborter([&] {
      absl::SleepFor(absl::Milliseconds(100));
      p.receiver->Abort();
    });
    std::byte b[16];
    const absl::Time start = absl::Now();
    const absl::Status s = p.receiver->Recv(b, sizeof(b), Within(absl::Seconds(30)));
    aborter.join();
    CHECK(s.code() == absl::StatusCode::kAborted);
    CHECK(absl::Now() - start < absl::Seconds(5));
    CHECK(p.receiver->Send(b, 1, Within(absl::Seconds(1))).code() == absl::StatusCode::kAborted);
  }
  SECTION("a pending offer nobody joins") {
    auto pending = kind->Offer(-1);
    REQUIRE(pending.ok());
    CHECK((*pending)->Complete(Within(absl::Milliseconds(100))).status().code() ==
          absl::StatusCode::kDeadlineExceeded);
  }
}

TEST_CASE("socket row link: bad offers and hosts are named", "[peers]") {
  auto kind = NewSocketRowLinkKind("127.0.0.1");
  for (const char* offer :
       {"", "127.0.0.1", "127.0.0.1 x 00000000000000000000000000000000",
        "127.0.0.1 70000 00000000000000000000000000000000", "127.0.0.1 80 short"}) {
    INFO(offer);
    auto joined = kind->Join(offer, -1, Within(absl::Seconds(1)));
    CHECK(joined.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(joined.status().message()), Catch::Contains("header.row_link.offer"));
  }
  auto nowhere = NewSocketRowLinkKind("no-such-host.invalid");
  auto offered = nowhere->Offer(-1);
  CHECK(offered.status().code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(offered.status().message()), Catch::Contains("--row_link_host"));
}

std::vector<std::unique_ptr<RowLinkKind>> SocketOnly() {
  std::vector<std::unique_ptr<RowLinkKind>> kinds;
  kinds.push_back(NewSocketRowLinkKind("127.0.0.1"));
  return kinds;
}

// Completes a lease's pending offer by joining it here; returns the receiver's end.
std::unique_ptr<RowLink> CompleteLease(RowLinks& links, RowLinks::SenderLease& lease) {
  REQUIRE(lease.pending != nullptr);
  absl::StatusOr<std::unique_ptr<RowLink>> joined;
  std::thread joiner([&] {
    joined = links.Find(lease.kind)->Join(lease.pending->offer(), -1, Within(absl::Seconds(10)));
  });
  auto completed = lease.pending->Complete(Within(absl::Seconds(10)));
  joiner.join();
  REQUIRE(completed.ok());
  REQUIRE(joined.ok());
  lease.pending.reset();
  lease.link = *std::move(completed);
  return *std::move(joined);
}

TEST_CASE("row link cache: reuse, restarts, failures, refusals, idleness", "[peers]") {
  RowLinks links(SocketOnly());
  CHECK(links.names() == std::vector<std::string>{"socket"});
  CHECK(links.Find("socket") != nullptr);
  CHECK(links.Find("nccl") == nullptr);
  const std::vector<std::string> peer_kinds = {"socket"};

  // A peer that accepts no kind of ours: no link.
  CHECK(links.Acquire("b:1", "boot1", "dest", -1, {"nccl"}).status().code() ==
        absl::StatusCode::kNotFound);

  auto lease = links.Acquire("b:1", "boot1", "dest", -1, peer_kinds);
  REQUIRE(lease.ok());
  CHECK(lease->link == nullptr);
  CHECK(lease->link_id.size() == 16);
  const std::string link_id = lease->link_id;
  std::unique_ptr<RowLink> far = CompleteLease(links, *lease);
  links.Release(*std::move(lease), /*ok=*/true);
  CHECK(links.counters().offered == 1);
  CHECK(links.counters().idle == 1);
  // The receiver keeps its end by id; Take hands it out once.
  links.CountJoined();
  links.Return(link_id, std::move(far), /*ok=*/true, /*reused=*/false);
  auto taken = links.Take(link_id);
  REQUIRE(taken.ok());
  CHECK(links.Take(link_id).status().code() == absl::StatusCode::kNotFound);

  // The same peer, boot and destination: the kept link, same id.
  auto again = links.Acquire("b:1", "boot1", "dest", -1, peer_kinds);
  REQUIRE(again.ok());
  REQUIRE(again->link != nullptr);
  CHECK(again->link_id == link_id);
  CHECK(again->pending == nullptr);
  CHECK(links.counters().reused == 1);
  // Another destination: a new offer.
  auto other = links.Acquire("b:1", "boot1", "dest-2", -1, peer_kinds);
  REQUIRE(other.ok());
  CHECK(other->pending != nullptr);
  links.Release(*std::move(other), true);  // never completed: nothing kept
  links.Release(*std::move(again), true);
  CHECK(links.counters().idle == 1);

  // The peer restarted (another boot id): its old links are closed, a new one offered.
  auto restarted = links.Acquire("b:1", "boot2", "dest", -1, peer_kinds);
  REQUIRE(restarted.ok());
  CHECK(restarted->pending != nullptr);
  CHECK(links.counters().closed == 1);
  CHECK(links.counters().idle == 0);
  std::unique_ptr<RowLink> far2 = CompleteLease(links, *restarted);
  // A failed transfer: the link is closed, not kept (and aborted, so its peer sees it go).
  links.Release(*std::move(restarted), /*ok=*/false);
  CHECK(links.counters().closed == 2);
  CHECK(links.counters().idle == 0);
  std::byte b;
  CHECK(far2->Recv(&b, 1, Within(absl::Seconds(5))).code() == absl::StatusCode::kUnavailable);

  // A refusal: no offers to that destination for a while.
  auto refused = links.Acquire("b:1", "boot2", "host-pool", -1, peer_kinds);
  REQUIRE(refused.ok());
  const std::string key = refused->key;
  links.Release(*std::move(refused), false);
  links.Refuse(key);
  CHECK(links.Acquire("b:1", "boot2", "host-pool", -1, peer_kinds).status().code() ==
        absl::StatusCode::kNotFound);

  // The daemon's sweep: a peer that is down (absent from `up`) or up under another boot id
  // loses its sender links; links of peers up under the same boot id stay.
  {
    RowLinks swept(SocketOnly());
    auto to_b = swept.Acquire("b:1", "boot1", "d", -1, peer_kinds);
    auto to_c = swept.Acquire("c:1", "bootc", "d", -1, peer_kinds);
    auto to_e = swept.Acquire("e:1", "boote", "d", -1, peer_kinds);
    REQUIRE((to_b.ok() && to_c.ok() && to_e.ok()));
    std::unique_ptr<RowLink> far_b = CompleteLease(swept, *to_b);
    std::unique_ptr<RowLink> far_c = CompleteLease(swept, *to_c);
    std::unique_ptr<RowLink> far_e = CompleteLease(swept, *to_e);
    swept.Release(*std::move(to_b), true);
    swept.Release(*std::move(to_c), true);
    swept.Release(*std::move(to_e), true);
    REQUIRE(swept.counters().idle == 3);
    swept.Sweep({{"b:1", "boot1"}, {"c:1", "bootc-restarted"}});  // e:1 is down
    CHECK(swept.counters().idle == 1);
    CHECK(swept.counters().closed == 2);
    auto kept = swept.Acquire("b:1", "boot1", "d", -1, peer_kinds);
    REQUIRE(kept.ok());
    CHECK(kept->link != nullptr);
  }

  // Idle links go at the next look.
  RowLinks brief(SocketOnly(), uint64_t{1} << 20, absl::Milliseconds(50));
  auto l = brief.Acquire("c:1", "boot", "d", -1, peer_kinds);
  REQUIRE(l.ok());
  std::unique_ptr<RowLink> far3 = CompleteLease(brief, *l);
  brief.Return("far3", std::move(far3), true, false);
  brief.Release(*std::move(l), true);
  CHECK(brief.counters().idle == 2);
  absl::SleepFor(absl::Milliseconds(120));
  CHECK(brief.Take("far3").status().code() == absl::StatusCode::kNotFound);
  CHECK(brief.counters().idle == 0);
  CHECK(brief.counters().closed == 2);
}

}  // namespace
}  // namespace cachemgr
