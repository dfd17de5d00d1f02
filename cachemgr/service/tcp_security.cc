#include "cachemgr/service/tcp_security.h"

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cachemgr/util/secret_file.h"

namespace cachemgr {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* flag) {
  std::ifstream in(path);
  std::stringstream buf;
  buf << in.rdbuf();
  if (!in || buf.str().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot read ", path));
  }
  return buf.str();
}

}  // namespace

TcpAuthProcessor::TcpAuthProcessor(std::string bearer_token, bool accept_verified_client_cert)
    : bearer_token_(std::move(bearer_token)),
      accept_verified_client_cert_(accept_verified_client_cert) {}

grpc::Status TcpAuthProcessor::Process(const InputMetadata& auth_metadata,
                                       grpc::AuthContext* context,
                                       OutputMetadata* consumed_auth_metadata,
                                       OutputMetadata* /*response_metadata*/) {
  // Under mutual TLS the handshake already refused peers without a certificate signed by the
  // client CA; a connection that got here is authenticated by its certificate.
  if (accept_verified_client_cert_ && context->IsPeerAuthenticated()) return grpc::Status::OK;
  auto it = auth_metadata.find("authorization");
  if (it == auth_metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "TCP callers must send \"authorization: Bearer <token>\" metadata (the "
                        "token in the daemon's --tcp_token_file)");
  }
  const absl::string_view value(it->second.data(), it->second.size());
  if (bearer_token_.empty() || !absl::StartsWith(value, "Bearer ") ||
      !ConstantTimeEquals(value.substr(7), bearer_token_)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "the bearer token in \"authorization\" is not valid");
  }
  consumed_auth_metadata->emplace("authorization", std::string(value));
  return grpc::Status::OK;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeTcpServerCredentials(
    const TcpSecurityOptions& options) {
  std::shared_ptr<grpc::ServerCredentials> creds;
  const bool mutual = !options.client_ca_file.empty();
  if (options.plaintext_loopback) {
    creds = grpc::experimental::LocalServerCredentials(LOCAL_TCP);
  } else {
    grpc::SslServerCredentialsOptions ssl(
        mutual ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
               : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
    auto cert = ReadPem(options.cert_file, "--tls_cert_file");
    if (!cert.ok()) return cert.status();
    auto key = ReadPem(options.key_file, "--tls_key_file");
    if (!key.ok()) return key.status();
    pair.cert_chain = *std::move(cert);
    pair.private_key = *std::move(key);
    ssl.pem_key_cert_pairs.push_back(std::move(pair));
    if (mutual) {
      auto ca = ReadPem(options.client_ca_file, "--tls_client_ca_file");
      if (!ca.ok()) return ca.status();
      ssl.pem_root_certs = *std::move(ca);
    }
    creds = grpc::SslServerCredentials(ssl);
  }
  creds->SetAuthMetadataProcessor(std::make_shared<TcpAuthProcessor>(options.bearer_token, mutual));
  return creds;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakePeerChannelCredentials(
    const TcpSecurityOptions& own, const std::string& peer_ca_file) {
  if (own.plaintext_loopback) return grpc::experimental::LocalCredentials(LOCAL_TCP);
  grpc::SslCredentialsOptions ssl;
  auto ca = ReadPem(peer_ca_file, "--peer_ca_file");
  if (!ca.ok()) return ca.status();
  ssl.pem_root_certs = *std::move(ca);
  // This daemon's certificate is its client certificate: peers under mutual TLS verify it.
  auto cert = ReadPem(own.cert_file, "--tls_cert_file");
  if (!cert.ok()) return cert.status();
  auto key = ReadPem(own.key_file, "--tls_key_file");
  if (!key.ok()) return key.status();
  ssl.pem_cert_chain = *std::move(cert);
  ssl.pem_private_key = *std::move(key);
  return grpc::SslCredentials(ssl);
}

}  // namespace cachemgr
