// TCP is off by default; when on it is TLS (mutual TLS with a client CA), or plaintext only on
// loopback and only when asked for, and every call of every service (cachemgr.v1, health,
// reflection) must authenticate: the bearer token, or under mutual TLS a verified client
// certificate. Secret files others could read are refused at start. Certificates are made at
// test time with the openssl CLI.
#include <sys/stat.h>
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "cachemgr/client/client.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/generic/generic_stub.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"
#include "tests/support/temp_dir.h"

namespace cachemgr::testing {
namespace {

constexpr char kToken[] = "s3cret-token-0123456789";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

// A throwaway PKI in `dir`: ca.pem (+ ca.key), server.pem/server.key for localhost and
// 127.0.0.1, client.pem/client.key signed by the CA, and rogue.pem/rogue.key signed by another
// CA. Keys are mode 0600.
void MakeCertificates(const TempDir& dir) {
  const std::string script = absl::StrCat(
      "set -e; cd ", dir.path(),
      "; exec >openssl.log 2>&1"
      "; key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out $1; }"
      "; key ca.key; key rogue-ca.key; key server.key; key client.key; key rogue.key"
      "; openssl req -x509 -key ca.key -out ca.pem -days 2 -subj /CN=cachemgr-test-ca"
      "; openssl req -x509 -key rogue-ca.key -out rogue-ca.pem -days 2 -subj /CN=rogue-ca"
      "; printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > server.ext"
      "; openssl req -new -key server.key -out server.csr -subj /CN=localhost"
      "; openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial"
      " -out server.pem -days 2 -extfile server.ext"
      "; openssl req -new -key client.key -out client.csr -subj /CN=scheduler"
      "; openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial"
      " -out client.pem -days 2"
      "; openssl req -new -key rogue.key -out rogue.csr -subj /CN=rogue"
      "; openssl x509 -req -in rogue.csr -CA rogue-ca.pem -CAkey rogue-ca.key -CAcreateserial"
      " -out rogue.pem -days 2"
      "; chmod 600 *.key");
  INFO(ReadFile(dir.file("openssl.log")));
  REQUIRE(std::system(script.c_str()) == 0);
}

void WriteToken(const std::string& path, mode_t mode = 0600) {
  { std::ofstream(path) << kToken << "\n"; }
  REQUIRE(::chmod(path.c_str(), mode) == 0);
}

int TcpPort(DaemonProcess& daemon) {
  std::smatch m;
  const std::string log = daemon.log_contents();
  REQUIRE(std::regex_search(log, m, std::regex("127\\.0\\.0\\.1:0 port ([0-9]+)")));
  return std::stoi(m[1]);
}

std::shared_ptr<grpc::Channel> Channel(int port,
                                       std::shared_ptr<grpc::ChannelCredentials> credentials) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port), std::move(credentials), args);
}

std::shared_ptr<grpc::ChannelCredentials> Tls(const TempDir& pki, const std::string& client = "") {
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = ReadFile(pki.file("ca.pem"));
  if (!client.empty()) {
    ssl.pem_cert_chain = ReadFile(pki.file(client + ".pem"));
    ssl.pem_private_key = ReadFile(pki.file(client + ".key"));
  }
  return grpc::SslCredentials(ssl);
}

void Prepare(grpc::ClientContext& ctx, const std::string& authorization) {
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
}

grpc::Status Stats(const std::shared_ptr<grpc::Channel>& channel,
                   const std::string& authorization) {
  auto stub = v1::CacheManager::NewStub(channel);
  grpc::ClientContext ctx;
  Prepare(ctx, authorization);
  v1::StatsResponse resp;
  return stub->Stats(&ctx, v1::StatsRequest(), &resp);
}

grpc::Status Health(const std::shared_ptr<grpc::Channel>& channel,
                    const std::string& authorization) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  Prepare(ctx, authorization);
  grpc::health::v1::HealthCheckResponse resp;
  return stub->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &resp);
}

// Server reflection's list_services, sent as one message on its bidi stream; the status and
// the raw reply.
std::pair<grpc::Status, std::string> ListServices(const std::shared_ptr<grpc::Channel>& channel,
                                                  const std::string& authorization) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  Prepare(ctx, authorization);
  const std::string request("\x3a\x00", 2);  // ServerReflectionRequest{list_services: ""}
  grpc::Slice slice(request);
  grpc::ByteBuffer request_bytes(&slice, 1), response_bytes;
  grpc::Status status;
  absl::Notification done;
  stub.UnaryCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                 grpc::StubOptions(), &request_bytes, &response_bytes, [&](grpc::Status s) {
                   status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();
  std::string reply;
  std::vector<grpc::Slice> slices;
  if (status.ok() && response_bytes.Dump(&slices).ok()) {
    for (const grpc::Slice& s : slices) reply.append(s.begin(), s.end());
  }
  return {status, reply};
}

// Every service on the port refuses calls without credentials and serves them with.
void CheckEveryServiceAuthenticates(const std::shared_ptr<grpc::Channel>& channel) {
  const std::string bearer = absl::StrCat("Bearer ", kToken);
  const grpc::Status none = Stats(channel, "");
  CHECK(none.error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK_THAT(none.error_message(), Catch::Contains("authorization"));
  CHECK(Stats(channel, "Bearer wrong-token-0123456789").error_code() ==
        grpc::StatusCode::UNAUTHENTICATED);
  CHECK(Stats(channel, kToken).error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(Health(channel, "").error_code() == grpc::StatusCode::UNAUTHENTICATED);
  CHECK(ListServices(channel, "").first.error_code() == grpc::StatusCode::UNAUTHENTICATED);

  CHECK(Stats(channel, bearer).ok());
  CHECK(Health(channel, bearer).ok());
  const auto [listed, reply] = ListServices(channel, bearer);
  CHECK(listed.ok());
  CHECK_THAT(reply, Catch::Contains("cachemgr.v1.CacheManager"));
}

TEST_CASE("plaintext TCP on loopback: every service needs the bearer token", "[service]") {
  TempDir secrets;
  WriteToken(secrets.file("token"));
  auto daemon = DaemonProcess::Start({"--tcp_address=127.0.0.1:0", "--tcp_plaintext_loopback",
                                      "--tcp_token_file=" + secrets.file("token")});
  REQUIRE(daemon.ok());
  CheckEveryServiceAuthenticates(Channel(TcpPort(**daemon), grpc::InsecureChannelCredentials()));

  auto unix_stub = RawStub((*daemon)->socket_path());
  grpc::ClientContext ctx;
  v1::StatsResponse resp;
  CHECK(unix_stub->Stats(&ctx, v1::StatsRequest(), &resp).ok());
}

TEST_CASE("TLS: token-authenticated calls; a plaintext client gets nowhere", "[service]") {
  TempDir pki;
  MakeCertificates(pki);
  WriteToken(pki.file("token"));
  auto daemon = DaemonProcess::Start(
      {"--tcp_address=127.0.0.1:0", "--tls_cert_file=" + pki.file("server.pem"),
       "--tls_key_file=" + pki.file("server.key"), "--tcp_token_file=" + pki.file("token")});
  REQUIRE(daemon.ok());
  const int port = TcpPort(**daemon);
  CHECK_THAT((*daemon)->log_contents(), Catch::Contains(absl::StrCat("port ", port, " TLS")));
  CheckEveryServiceAuthenticates(Channel(port, Tls(pki)));
  // Plaintext to the TLS port: the handshake never happens.
  const grpc::Status plain =
      Stats(Channel(port, grpc::InsecureChannelCredentials()), absl::StrCat("Bearer ", kToken));
  CHECK(plain.error_code() == grpc::StatusCode::UNAVAILABLE);

  // The clients' TLS options: the C++ library and cachemgrctl.
  client::ConnectOptions options;
  options.address = absl::StrCat("127.0.0.1:", port);
  options.bearer_token = kToken;
  options.tls = true;
  options.tls_ca_file = pki.file("ca.pem");
  auto stats = client::GetStats("", options);
  CHECK(stats.ok());
  options.bearer_token.clear();
  CHECK(client::GetStats("", options).status().code() == absl::StatusCode::kUnauthenticated);
  auto ctl = ChildProcess::Spawn(
      CtlPath(), {"health", "--address=" + options.address, "--tls_ca_file=" + pki.file("ca.pem"),
                  "--token_file=" + pki.file("token")});
  REQUIRE(ctl.ok());
  auto line = (*ctl)->ReadLine(absl::Seconds(30));
  REQUIRE(line.ok());
  CHECK_THAT(*line, Catch::Contains("SERVING"));
  CHECK((*ctl)->Wait(absl::Seconds(30)).value_or(-1) == 0);
}

TEST_CASE("mutual TLS: a client certificate from the client CA is required and enough",
          "[service]") {
  TempDir pki;
  MakeCertificates(pki);
  auto daemon = DaemonProcess::Start(
      {"--tcp_address=127.0.0.1:0", "--tls_cert_file=" + pki.file("server.pem"),
       "--tls_key_file=" + pki.file("server.key"), "--tls_client_ca_file=" + pki.file("ca.pem")});
  REQUIRE(daemon.ok());
  const int port = TcpPort(**daemon);
  CHECK_THAT((*daemon)->log_contents(), Catch::Contains("mutual TLS"));
  // The certificate authenticates every service without a token.
  auto with_cert = Channel(port, Tls(pki, "client"));
  CHECK(Stats(with_cert, "").ok());
  CHECK(Health(with_cert, "").ok());
  CHECK(ListServices(with_cert, "").first.ok());
  // No certificate, or one the client CA did not sign: the handshake fails.
  CHECK(Stats(Channel(port, Tls(pki)), "").error_code() == grpc::StatusCode::UNAVAILABLE);
  CHECK(Stats(Channel(port, Tls(pki, "rogue")), "").error_code() == grpc::StatusCode::UNAVAILABLE);
}

// Runs cachemgrd with `args` expecting it to refuse to start: its exit code (124 if it still
// runs after 20 s) and output.
std::pair<int, std::string> RefusedStart(std::vector<std::string> args) {
  TempDir dir;
  args.insert(args.begin(), "--socket=" + dir.file("never.sock"));
  const std::string out = dir.file("out");
  const std::string command =
      absl::StrCat("timeout 20 ", DaemonPath(), " ", absl::StrJoin(args, " "), " >", out, " 2>&1");
  const int status = std::system(command.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, ReadFile(out)};
}

TEST_CASE("TCP is refused at start without TLS, off loopback, or without credentials",
          "[service]") {
  TempDir secrets;
  WriteToken(secrets.file("token"));
  const std::string token_flag = "--tcp_token_file=" + secrets.file("token");
  {
    const auto [code, out] = RefusedStart({"--tcp_address=127.0.0.1:0", token_flag});
    CHECK(code == 2);
    CHECK_THAT(out, Catch::Contains("--tcp_address needs TLS"));
  }
  {
    const auto [code, out] =
        RefusedStart({"--tcp_address=0.0.0.0:0", "--tcp_plaintext_loopback", token_flag});
    CHECK(code == 2);
    CHECK_THAT(out, Catch::Contains("needs a loopback"));
  }
  {
    const auto [code, out] =
        RefusedStart({"--tcp_address=127.0.0.1:0", "--tcp_plaintext_loopback"});
    CHECK(code == 2);
    CHECK_THAT(out, Catch::Contains("--tcp_token_file"));
  }
}

TEST_CASE("a token or key file others can read is refused at start, naming file and mode",
          "[service]") {
  TempDir secrets;
  WriteToken(secrets.file("token"), 0644);
  const auto [code, out] = RefusedStart({"--tcp_address=127.0.0.1:0", "--tcp_plaintext_loopback",
                                         "--tcp_token_file=" + secrets.file("token")});
  CHECK(code == 2);
  CHECK_THAT(out, Catch::Contains(secrets.file("token")) && Catch::Contains("mode 0644"));

  TempDir pki;
  MakeCertificates(pki);
  REQUIRE(::chmod(pki.file("server.key").c_str(), 0640) == 0);
  WriteToken(pki.file("token"));
  const auto [key_code, key_out] = RefusedStart(
      {"--tcp_address=127.0.0.1:0", "--tls_cert_file=" + pki.file("server.pem"),
       "--tls_key_file=" + pki.file("server.key"), "--tcp_token_file=" + pki.file("token")});
  CHECK(key_code == 2);
  CHECK_THAT(key_out, Catch::Contains("server.key") && Catch::Contains("mode 0640"));
}

}  // namespace
}  // namespace cachemgr::testing
