// Who may use the daemon and what each caller sees (docs/SECURITY.md): the kernel's credentials
// of every Unix-socket peer, sessions bound to the uid that attached them, other tenants'
// sequences invisible, operator rights only with the operator credential, group access with
// --socket_group. Other uids are played by child processes that switch to uid 65534 before
// exec (ChildProcess::SpawnAs), so these tests need root; they are skipped otherwise.
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/service/service_test_util.h"
#include "tests/support/daemon_process.h"

namespace cachemgr::testing {
namespace {

constexpr gid_t kTestGroup = 4242;  // numeric: needs no entry in /etc/group
// A Compress an operator may make (no inputs needed), so that only the credential decides.
constexpr char kOperatorCompress[] = "policy { preset: \"streamingllm\" } reserve_ratio: 0.5";

struct CallResult {
  std::string status;    // "CODE message"
  std::string response;  // one-line text format
  std::string code() const { return status.substr(0, status.find(' ')); }
};

// One call through cachemgr_test_call, as `who` (nullopt: as the test process).
CallResult CallAs(const std::optional<ChildIdentity>& who, const std::string& socket,
                  const std::string& method, const std::string& request,
                  const std::string& operator_token_file = "") {
  std::vector<std::string> args = {"--socket=" + socket, "--method=" + method,
                                   "--request=" + request};
  if (!operator_token_file.empty()) args.push_back("--operator_token_file=" + operator_token_file);
  auto child = who.has_value() ? ChildProcess::SpawnAs(*who, CallToolPath(), args)
                               : ChildProcess::Spawn(CallToolPath(), args);
  REQUIRE(child.ok());
  CallResult r;
  auto status = (*child)->ReadLine(absl::Seconds(30));
  REQUIRE(status.ok());
  r.status = *status;
  auto response = (*child)->ReadLine(absl::Seconds(30));
  if (response.ok()) r.response = *response;
  auto code = (*child)->Wait(absl::Seconds(30));
  REQUIRE(code.ok());
  CHECK(*code == 0);
  return r;
}

// The KV client tool as `who`: attaches, writes a sequence through the mapped pool, compares its
// digests with the daemon's and detaches. Its JSON line.
std::string KvClientAs(const ChildIdentity& who, const std::string& socket,
                       const std::string& sequence) {
  auto child = ChildProcess::SpawnAs(
      who, KvClientPath(), {"--socket=" + socket, "--sequence=" + sequence, "--name=tenant"});
  REQUIRE(child.ok());
  auto line = (*child)->ReadLine(absl::Seconds(30));
  REQUIRE(line.ok());
  auto code = (*child)->Wait(absl::Seconds(30));
  REQUIRE(code.ok());
  return *line;
}

// Lets other users reach the daemon's directory (mkdtemp makes it 0700).
void OpenDirectory(const DaemonProcess& daemon) {
  REQUIRE(::chmod(daemon.dir().c_str(), 0755) == 0);
}

// Attaches from the test process (uid 0) with a raw stub and allocates `sequence`.
std::string AttachAndAllocate(v1::CacheManager::Stub& stub, const std::string& sequence) {
  grpc::ClientContext actx;
  v1::AttachRequest attach;
  attach.set_client_name("root-engine");
  *attach.mutable_model() = StoriesModel();
  attach.set_num_blocks(32);
  v1::AttachResponse attached;
  REQUIRE(stub.Attach(&actx, attach, &attached).ok());
  grpc::ClientContext alloc_ctx;
  v1::AllocateRequest alloc;
  alloc.set_session_token(attached.session_token());
  alloc.set_sequence_id(sequence);
  alloc.set_num_new_tokens(40);
  v1::AllocateResponse allocated;
  REQUIRE(stub.Allocate(&alloc_ctx, alloc, &allocated).ok());
  return attached.session_token();
}

#define REQUIRE_ROOT()                                         \
  if (::geteuid() != 0) {                                      \
    WARN("needs root to run clients as another uid; skipped"); \
    return;                                                    \
  }

TEST_CASE("another uid can neither connect to the 0600 socket nor pass the peer check",
          "[service]") {
  REQUIRE_ROOT();
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  OpenDirectory(**daemon);
  const std::string socket = (*daemon)->socket_path();
  const ChildIdentity nobody;

  // The file mode stops it at connect().
  CHECK(CallAs(nobody, socket, "Stats", "").code() == "UNAVAILABLE");
  // A loosened mode (the old unit file's group advice, a careless chmod) does not let it in:
  // the daemon reads the peer's uid at accept and closes the connection.
  REQUIRE(::chmod(socket.c_str(), 0666) == 0);
  const CallResult refused = CallAs(nobody, socket, "Stats", "");
  CHECK(refused.code() == "UNAVAILABLE");
  CHECK_THAT((*daemon)->log_contents(),
             Catch::Contains("connection refused") && Catch::Contains("uid 65534"));
  // The share channel applies the same policy.
  REQUIRE(::chmod((socket + ".share").c_str(), 0666) == 0);
  const std::string kv = KvClientAs(nobody, socket, "x");
  CHECK_THAT(kv, Catch::Contains("error"));
  // The daemon's own uid still gets in.
  CHECK(CallAs(std::nullopt, socket, "Stats", "").code() == "OK");
}

TEST_CASE("an allowed uid is a tenant: its own pool, and other tenants' sequences invisible",
          "[service]") {
  REQUIRE_ROOT();
  auto daemon = DaemonProcess::Start({"--allowed_uids=65534"});
  REQUIRE(daemon.ok());
  OpenDirectory(**daemon);
  const std::string socket = (*daemon)->socket_path();
  CHECK(FileMode(socket) == 0666);  // the peer check, not the mode, tells tenants apart
  auto stub = RawStub(socket);
  const std::string root_token = AttachAndAllocate(*stub, "root-seq");
  const std::string digest_before =
      CallAs(std::nullopt, socket, "GetSequence",
             "sequence_id: \"root-seq\" include_kv_digest: true", socket + ".operator")
          .response;
  REQUIRE_THAT(digest_before, Catch::Contains("kv_digest"));
  const ChildIdentity nobody;

  // The tenant attaches and works through its own mapping (share channel included), and stays.
  auto tenant = ChildProcess::SpawnAs(nobody, KvClientPath(),
                                      {"--socket=" + socket, "--sequence=tenant-seq", "--hold"});
  REQUIRE(tenant.ok());
  const auto kv = (*tenant)->ReadLine(absl::Seconds(30));
  REQUIRE(kv.ok());
  CAPTURE(*kv);
  CHECK_THAT(*kv, !Catch::Contains("error"));
  CHECK_THAT(*kv, Catch::Contains("\"daemon_digests\""));

  // Root's sequence does not exist as far as the tenant can tell.
  const CallResult list = CallAs(nobody, socket, "ListSequences", "");
  CHECK(list.code() == "OK");
  CHECK_THAT(list.response, !Catch::Contains("root-seq"));
  const CallResult get =
      CallAs(nobody, socket, "GetSequence", "sequence_id: \"root-seq\" include_kv_digest: true");
  CHECK(get.code() == "NOT_FOUND");
  CHECK_THAT(get.response, !Catch::Contains("kv_digest"));
  const CallResult stats = CallAs(nobody, socket, "Stats", "");
  CHECK(stats.code() == "OK");
  CHECK_THAT(stats.response, !Catch::Contains("root-engine") && !Catch::Contains("stories260K-1"));
  CHECK_THAT(stats.response, Catch::Contains("kv-client") && Catch::Contains("stories260K-2"));
  // Freeing or compressing it without a session is an operator call.
  const CallResult free_call = CallAs(nobody, socket, "Free", "sequence_id: \"root-seq\"");
  CHECK(free_call.code() == "PERMISSION_DENIED");
  CHECK_THAT(free_call.status, Catch::Contains("operator credential"));
  CHECK(CallAs(nobody, socket, "Compress",
               absl::StrCat("sequence_id: \"root-seq\" ", kOperatorCompress))
            .code() == "PERMISSION_DENIED");
  // Root's session token, copied out of its process, is useless to the tenant.
  for (const std::string method : {"Heartbeat", "Detach"}) {
    const CallResult stolen =
        CallAs(nobody, socket, method, absl::StrCat("session_token: \"", root_token, "\""));
    CAPTURE(method, stolen.status);
    CHECK(stolen.code() == "PERMISSION_DENIED");
    CHECK_THAT(stolen.status, Catch::Contains("uid 0"));
  }
  const CallResult stolen_free =
      CallAs(nobody, socket, "Free",
             absl::StrCat("session_token: \"", root_token, "\" sequence_id: \"root-seq\""));
  CHECK(stolen_free.code() == "PERMISSION_DENIED");

  // Root's sequence is untouched, and the tenant got a pool of its own for the same model.
  const CallResult after =
      CallAs(std::nullopt, socket, "GetSequence",
             "sequence_id: \"root-seq\" include_kv_digest: true", socket + ".operator");
  CHECK(after.code() == "OK");
  CHECK(after.response == digest_before);
  const CallResult all = CallAs(std::nullopt, socket, "Stats", "", socket + ".operator");
  CHECK_THAT(all.response, Catch::Contains("stories260K-1") && Catch::Contains("stories260K-2"));
}

TEST_CASE("a same-uid caller acts as operator only with the operator credential", "[service]") {
  auto daemon = DaemonProcess::Start();
  REQUIRE(daemon.ok());
  const std::string socket = (*daemon)->socket_path();
  const std::string operator_file = socket + ".operator";
  CHECK(FileMode(operator_file) == 0600);
  auto stub = RawStub(socket);
  AttachAndAllocate(*stub, "victim");

  // Same uid, no credential: its own uid's view only, and no operator actions.
  CHECK(CallAs(std::nullopt, socket, "Free", "sequence_id: \"victim\"").code() ==
        "PERMISSION_DENIED");
  CHECK(CallAs(std::nullopt, socket, "Compress",
               absl::StrCat("sequence_id: \"victim\" ", kOperatorCompress))
            .code() == "PERMISSION_DENIED");
  CHECK(CallAs(std::nullopt, socket, "Compress",
               absl::StrCat("sequence_id: \"victim\" ", kOperatorCompress), operator_file)
            .code() == "OK");
  CHECK(CallAs(std::nullopt, socket, "Watch", "").code() == "PERMISSION_DENIED");
  CHECK(CallAs(std::nullopt, socket, "Free", "sequence_id: \"victim\"", "/dev/null").code() ==
        "PERMISSION_DENIED");  // an empty credential is no credential
  // With it: the operator.
  const CallResult freed =
      CallAs(std::nullopt, socket, "Free", "sequence_id: \"victim\"", operator_file);
  CHECK(freed.code() == "OK");
  CHECK_THAT(freed.response, Catch::Contains("blocks_released"));
  // The credential dies with the daemon: the file goes, and the next daemon makes a new one.
  const std::string token_text = CallAs(std::nullopt, socket, "Stats", "", operator_file).code();
  CHECK(token_text == "OK");
  REQUIRE((*daemon)->Terminate(SIGTERM).ok());
  CHECK(::access(operator_file.c_str(), F_OK) != 0);
}

TEST_CASE("--socket_group: members connect through both sockets, others cannot", "[service]") {
  REQUIRE_ROOT();
  auto daemon = DaemonProcess::Start(
      {absl::StrCat("--socket_group=", kTestGroup), absl::StrCat("--operator_group=", kTestGroup)});
  REQUIRE(daemon.ok());
  OpenDirectory(**daemon);
  const std::string socket = (*daemon)->socket_path();
  for (const std::string& path : {socket, socket + ".share", socket + ".fast"}) {
    struct stat st = {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0660);
    CHECK(st.st_gid == kTestGroup);
  }
  struct stat token_st = {};
  REQUIRE(::stat((socket + ".operator").c_str(), &token_st) == 0);
  CHECK((token_st.st_mode & 0777) == 0640);
  CHECK(token_st.st_gid == kTestGroup);

  ChildIdentity member;
  member.supplementary_groups = {kTestGroup};
  ChildIdentity primary_member;
  primary_member.gid = kTestGroup;
  const ChildIdentity outsider;

  const std::string kv = KvClientAs(member, socket, "member-seq");
  CAPTURE(kv);
  CHECK_THAT(kv, !Catch::Contains("error"));
  CHECK(CallAs(primary_member, socket, "Stats", "").code() == "OK");
  CHECK(CallAs(outsider, socket, "Stats", "").code() == "UNAVAILABLE");
  // --operator_group: members may read the credential and act as operators.
  auto stub = RawStub(socket);
  AttachAndAllocate(*stub, "root-seq");
  CHECK(CallAs(member, socket, "Free", "sequence_id: \"root-seq\"").code() == "PERMISSION_DENIED");
  CHECK(CallAs(member, socket, "Free", "sequence_id: \"root-seq\"", socket + ".operator").code() ==
        "OK");
}

}  // namespace
}  // namespace cachemgr::testing
