// RETURN_IF_ERROR / ASSIGN_OR_RETURN for absl::Status and absl::StatusOr (Debian's abseil
// 20220623 ships neither).
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define CACHEMGR_CONCAT_INNER_(a, b) a##b
#define CACHEMGR_CONCAT_(a, b) CACHEMGR_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status) and returns it from the enclosing function if not OK.
#define RETURN_IF_ERROR(expr)                            \
  do {                                                   \
    ::absl::Status cachemgr_status_ = (expr);            \
    if (!cachemgr_status_.ok()) return cachemgr_status_; \
  } while (false)

// `ASSIGN_OR_RETURN(auto x, MakeX());` declares/assigns the value or returns the error.
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  CACHEMGR_ASSIGN_OR_RETURN_IMPL_(CACHEMGR_CONCAT_(cachemgr_statusor_, __LINE__), lhs, rexpr)

#define CACHEMGR_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                    \
  if (!statusor.ok()) return std::move(statusor).status();    \
  lhs = std::move(statusor).value()
