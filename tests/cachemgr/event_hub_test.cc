#include "cachemgr/event_hub.h"

#include <catch2/catch.hpp>
#include <vector>

namespace cachemgr {
namespace {

TEST_CASE("events reach subscribers in order with increasing seq", "[cpu]") {
  EventHub hub;
  std::vector<Event> got;
  bool closed = false;
  const uint64_t id = hub.Subscribe([&](const Event* e) {
    if (e) {
      got.push_back(*e);
    } else {
      closed = true;
    }
  });
  Event attached;
  attached.type = EventType::kClientAttached;
  attached.client_id = "c1";
  hub.Publish(attached);
  Event allocated;
  allocated.type = EventType::kSequenceAllocated;
  allocated.sequence_id = "s";
  hub.Publish(allocated);
  REQUIRE(got.size() == 2);
  CHECK(got[0].seq == 1);
  CHECK(got[1].seq == 2);
  CHECK(got[0].client_id == "c1");
  CHECK(got[1].type == EventType::kSequenceAllocated);
  CHECK(got[1].unix_micros >= got[0].unix_micros);
  hub.Unsubscribe(id);
  Event freed;
  freed.type = EventType::kSequenceFreed;
  hub.Publish(freed);
  CHECK(got.size() == 2);
  CHECK(hub.published() == 3);
  CHECK_FALSE(closed);
}

TEST_CASE("close tells every subscriber once and later subscribers at once", "[cpu]") {
  EventHub hub;
  int closes = 0;
  hub.Subscribe([&](const Event* e) { closes += e == nullptr; });
  hub.Close();
  hub.Close();
  CHECK(closes == 1);
  CHECK(hub.num_subscribers() == 0);
  int late = 0;
  hub.Subscribe([&](const Event* e) { late += e == nullptr; });
  CHECK(late == 1);
  hub.Publish({});
  CHECK(hub.published() == 0);
}

}  // namespace
}  // namespace cachemgr
