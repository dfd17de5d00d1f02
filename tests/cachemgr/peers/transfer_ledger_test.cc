// TransferLedger: a completed transfer is answered to its retry, a failed one runs again, an id
// is bound to what it transferred, and only the most recent completed ids are kept.
#include "cachemgr/peers/transfer_ledger.h"

#include <catch2/catch.hpp>
#include <string>

namespace cachemgr {
namespace {

using Ledger = TransferLedger<std::string>;

TEST_CASE("TransferLedger answers retries of completed transfers", "[cpu]") {
  Ledger ledger(2);
  std::string out;
  CHECK(ledger.Begin("a", "to-x", &out) == Ledger::Claim::kNew);
  CHECK(ledger.Begin("a", "to-x", &out) == Ledger::Claim::kInFlight);
  CHECK(ledger.Begin("a", "to-y", &out) == Ledger::Claim::kConflict);
  ledger.Complete("a", "done-a");
  CHECK(ledger.Begin("a", "to-x", &out) == Ledger::Claim::kDone);
  CHECK(out == "done-a");
  CHECK(ledger.Begin("a", "to-y", &out) == Ledger::Claim::kConflict);
  ledger.Forget("a");  // a completed transfer is not forgotten by a failed retry
  CHECK(ledger.Begin("a", "to-x", &out) == Ledger::Claim::kDone);

  // A failed attempt is forgotten: its retry runs again.
  CHECK(ledger.Begin("b", "to-x", &out) == Ledger::Claim::kNew);
  ledger.Forget("b");
  CHECK(ledger.Begin("b", "to-x", &out) == Ledger::Claim::kNew);
  ledger.Complete("b", "done-b");
  // The oldest of more than `capacity` completed ids goes.
  CHECK(ledger.Begin("c", "to-x", &out) == Ledger::Claim::kNew);
  ledger.Complete("c", "done-c");
  CHECK(ledger.Begin("a", "to-x", &out) == Ledger::Claim::kNew);
  CHECK(ledger.Begin("c", "to-x", &out) == Ledger::Claim::kDone);
}

}  // namespace
}  // namespace cachemgr
