// The TCP listener's security: TLS (gRPC's SSL credentials; mutual TLS when a client CA is
// given) or, only on a loopback address and only when asked for explicitly, plaintext. Either
// way every call of every service on the TCP port (cachemgr.v1, health, reflection) passes
// TcpAuthProcessor before any handler runs: it needs "authorization: Bearer <token>" metadata,
// or, under mutual TLS, a client certificate the handshake verified against the client CA.
// The processor removes the authorization metadata, so handlers never see the token.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/security/auth_metadata_processor.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

namespace cachemgr {

struct TcpSecurityOptions {
  // The bearer token callers must send; empty: only mutual TLS authenticates.
  std::string bearer_token;
  // PEM files: the server's certificate chain and key; the CA that signs client certificates
  // (mutual TLS: clients must present a certificate it verifies). Empty cert: no TLS.
  std::string cert_file, key_file, client_ca_file;
  // Plaintext on a loopback address (the config checked the address); never with TLS.
  bool plaintext_loopback = false;
};

// Checks each call's credentials; see the file comment. Never blocks (runs inline).
class TcpAuthProcessor final : public grpc::AuthMetadataProcessor {
 public:
  TcpAuthProcessor(std::string bearer_token, bool accept_verified_client_cert);
  bool IsBlocking() const override { return false; }
  grpc::Status Process(const InputMetadata& auth_metadata, grpc::AuthContext* context,
                       OutputMetadata* consumed_auth_metadata,
                       OutputMetadata* response_metadata) override;

 private:
  const std::string bearer_token_;
  const bool accept_verified_client_cert_;
};

// Server credentials for the TCP port with a TcpAuthProcessor installed. Plaintext uses gRPC's
// local credentials (LOCAL_TCP), which accept loopback connections only and, unlike insecure
// credentials, run an AuthMetadataProcessor. INVALID_ARGUMENT naming the flag of a PEM file
// that cannot be read.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeTcpServerCredentials(
    const TcpSecurityOptions& options);

// What this daemon dials its peers with (they run the same TCP security): local credentials
// when plaintext on loopback; else TLS verifying peers against `peer_ca_file`, presenting this
// daemon's certificate and key as the client certificate. INVALID_ARGUMENT naming the flag of
// a PEM file that cannot be read. The bearer token goes in each call's metadata.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakePeerChannelCredentials(
    const TcpSecurityOptions& own, const std::string& peer_ca_file);

}  // namespace cachemgr
