// The "socket" row link (row_link.h): one TCP connection per link, rows in host memory. The
// sender listens on an ephemeral port of `host` (the daemon's --row_link_host) and offers
// "HOST PORT NONCE", NONCE being 128 random bits in hex; the receiver connects and sends the
// nonce, and the sender accepts the first connection that presents it (others are closed), so
// only who read the offer from the authenticated stream joins. The rows then cross unencrypted,
// as NCCL's do: deploy both on a network you trust (docs/MULTINODE.md).
#pragma once

#include <memory>
#include <string>

#include "cachemgr/peers/row_link.h"

namespace cachemgr {

// Links of kind "socket" listening on `host` (a name or address the receivers reach this
// daemon at; not a wildcard).
std::unique_ptr<RowLinkKind> NewSocketRowLinkKind(std::string host);

}  // namespace cachemgr
