// What the daemon answers to requests it cannot read, and where the libraries' own complaints
// go.
//
// gRPC (1.51, callback API) deserializes a request before any handler runs, and when that fails
// it answers UNIMPLEMENTED with an empty message, as if the method did not exist: a client that
// sent garbage, or a string field that is not UTF-8, learns nothing. The interceptor made here
// notices the failed deserialization (its POST_RECV_MESSAGE hook sees no message) and rewrites
// that status, as it is sent, into INVALID_ARGUMENT "request is not a valid
// cachemgr.v1.AttachRequest (...)". It is created only for calls of cachemgr.v1 services.
//
// Protobuf logs parse problems (e.g. invalid UTF-8 in a string field) and gRPC logs its errors
// to stderr in their own formats; RouteLibraryLogsToJson sends both through cachemgr's JSON log
// (util/log.h) instead, with "source":"protobuf" / "source":"grpc".
#pragma once

#include <memory>
#include <string>

#include "absl/strings/string_view.h"
#include "grpcpp/support/server_interceptor.h"

namespace cachemgr {

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeUnparseableRequestInterceptorFactory();

// The message of that INVALID_ARGUMENT for a request of type `request_type` (a full protobuf
// name; empty when unknown). The fast path (fast_path_server.h) answers the same.
std::string UnparseableRequestMessage(absl::string_view request_type);

// Installs protobuf's log handler and gRPC's log function (process-wide; call once at start,
// before threads that may log exist).
void RouteLibraryLogsToJson();

}  // namespace cachemgr
