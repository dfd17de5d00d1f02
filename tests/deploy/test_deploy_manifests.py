"""deploy/: the container image and the Kubernetes manifests agree with each other and with the
real daemon.

The daemon's flags come from `$CACHEMGRD --help`; the ConfigMap's config file is started for real
(cachemgrd has no check-only mode), with its sockets and credential moved to a temporary
directory, its listeners on free loopback ports and freshly made TLS files and token, and the
DaemonSet's probe command is run against it when $CACHEMGRCTL names cachemgrctl.
CACHEMGR_DEPLOY_DIR reads another copy of deploy/ (to see the test catch a broken manifest).
"""

import json
import os
import pathlib
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = pathlib.Path(os.environ.get("CACHEMGR_DEPLOY_DIR", REPO / "deploy"))
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
CONFIG_KEY = "cachemgrd.conf"  # the ConfigMap's key holding the config file
DAEMON_CONTAINER = "cachemgrd"

# --- Loading ---------------------------------------------------------------------------------


def _manifests():
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append(doc)
    return docs


def _one(docs, kind):
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {KUBERNETES}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def docs():
    return _manifests()


@pytest.fixture(scope="module")
def daemonset(docs):
    return _one(docs, "DaemonSet")


@pytest.fixture(scope="module")
def service(docs):
    return _one(docs, "Service")


@pytest.fixture(scope="module")
def configmap(docs):
    return _one(docs, "ConfigMap")


@pytest.fixture(scope="module")
def pod_spec(daemonset):
    return daemonset["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod_spec):
    found = [c for c in pod_spec["containers"] if c["name"] == DAEMON_CONTAINER]
    assert len(found) == 1, f"the DaemonSet needs one container named {DAEMON_CONTAINER}"
    return found[0]


def _volume(pod_spec, name):
    found = [v for v in pod_spec.get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"volume {name!r} is not defined exactly once"
    return found[0]


def _mount_of(container, directory):
    """The volumeMount of `container` whose mountPath is `directory`."""
    found = [m for m in container.get("volumeMounts", []) if m["mountPath"] == directory]
    assert found, f"nothing is mounted at {directory} in container {container['name']}"
    return found[0]


def _port(address):
    host, sep, port = address.rpartition(":")
    assert sep and host and port.isdigit(), f"{address!r} is not HOST:PORT"
    return int(port)


# --- The config file, parsed as cachemgr/config.cc parses it -----------------------------------


def parse_config(text):
    """[(key, value)] of a `key = value` config file; `#` starts a comment."""
    settings = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, eq, value = line.partition("=")
        assert eq, f"line {lineno}: expected `key = value`, got {line!r}"
        settings.append((key.strip(), value.strip()))
    return settings


def commented_settings(text):
    """Keys of commented-out settings (`# key = value`), which a reader may uncomment."""
    return re.findall(r"^\s*#\s*([a-z][a-z0-9_]*)\s*=\s*\S", text, re.MULTILINE)


@pytest.fixture(scope="module")
def config_text(configmap):
    assert CONFIG_KEY in configmap.get("data", {}), f"the ConfigMap has no key {CONFIG_KEY}"
    return configmap["data"][CONFIG_KEY]


@pytest.fixture(scope="module")
def config(config_text):
    settings = parse_config(config_text)
    keys = [k for k, _ in settings]
    assert len(keys) == len(set(keys)), f"a key is set twice: {keys}"
    return dict(settings)


# --- The daemon binary ---------------------------------------------------------------------------


def _cachemgrd():
    binary = os.environ.get("CACHEMGRD")
    assert binary, "set CACHEMGRD to the cachemgrd binary"
    return binary


@pytest.fixture(scope="module")
def daemon_flags():
    """Every flag `cachemgrd --help` lists, without --help and --version."""
    out = subprocess.run([_cachemgrd(), "--help"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    flags = set(re.findall(r"^\s+--(?:\[no\])?([a-z][a-z0-9_]*)", out, re.MULTILINE))
    flags -= {"help", "version"}
    assert {"socket", "config", "memory_budget"} <= flags, f"unexpected --help output:\n{out}"
    return flags


# --- The Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions():
    """[(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):  # comments end no instruction, even mid-continuation
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def final_stage():
    instructions = dockerfile_instructions()
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1]:]


def entrypoint():
    found = [rest for word, rest in final_stage() if word == "ENTRYPOINT"]
    assert found, "the final stage has no ENTRYPOINT"
    argv = json.loads(found[-1])  # exec form: a JSON array, so SIGTERM reaches the daemon
    assert isinstance(argv, list) and argv, "ENTRYPOINT must be a JSON array"
    return argv


def entrypoint_config_path():
    configs = [a.split("=", 1)[1] for a in entrypoint() if a.startswith("--config=")]
    assert len(configs) == 1, f"ENTRYPOINT passes no single --config=FILE: {entrypoint()}"
    return configs[0]


def image_uid():
    """The final stage's USER as a uid: numeric, or the user the stage creates with --uid."""
    stage = final_stage()
    users = [rest for word, rest in stage if word == "USER"]
    assert users, "the final stage has no USER"
    user = users[-1].split(":")[0]
    if user.isdigit():
        return int(user)
    for word, rest in stage:
        if word == "RUN":
            match = re.search(r"useradd\b[^&;]*--uid[ =](\d+)[^&;]*\s" + re.escape(user) + r"\b",
                              rest)
            if match:
                return int(match.group(1))
    pytest.fail(f"USER {user} is neither numeric nor created with useradd --uid")


# --- Manifests agree with each other -------------------------------------------------------------


def test_manifests_parse(docs):
    kinds = sorted(d.get("kind", "?") for d in docs)
    assert kinds == ["ConfigMap", "DaemonSet", "Service"], kinds
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), doc.get("kind")


def test_service_is_headless_and_selects_the_daemon_pods(daemonset, service):
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    match_labels = daemonset["spec"]["selector"]["matchLabels"]
    assert match_labels and match_labels.items() <= labels.items(), \
        "the DaemonSet's selector does not match its own pod labels"
    spec = service["spec"]
    assert spec.get("clusterIP") == "None", "the peers Service must be headless"
    assert spec.get("publishNotReadyAddresses") is True
    selector = spec.get("selector")
    assert selector and selector.items() <= labels.items(), \
        f"Service selector {selector} does not match the DaemonSet's pod labels {labels}"


def test_service_port_is_the_tcp_port_and_a_container_port(service, container, config):
    assert "tcp_address" in config, "the config has no tcp_address"
    tcp_port = _port(config["tcp_address"])
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert "grpc" in ports, "the Service has no port named grpc"
    assert ports["grpc"]["port"] == tcp_port, "Service port grpc is not tcp_address's port"
    container_ports = {p["containerPort"]: p.get("name") for p in container["ports"]}
    target = ports["grpc"].get("targetPort", ports["grpc"]["port"])
    if isinstance(target, str):
        assert target in container_ports.values(), f"no containerPort named {target}"
        target = next(n for n, name in container_ports.items() if name == target)
    assert target == tcp_port, f"Service targets port {target}, the daemon listens on {tcp_port}"
    assert container_ports.get(tcp_port) == "grpc", f"containerPort {tcp_port} is not grpc"


def test_metrics_port_is_a_container_port(container, config):
    assert "metrics_address" in config, "the config has no metrics_address"
    container_ports = {p["containerPort"]: p.get("name") for p in container["ports"]}
    assert container_ports.get(_port(config["metrics_address"])) == "metrics"


def test_socket_directory_is_a_host_path_at_the_same_path(pod_spec, container, config):
    assert "socket" in config, "the config must name the socket"
    directory = posixpath.dirname(config["socket"])
    # The share and fast sockets and the operator credential default to SOCKET.share,
    # SOCKET.fast, SOCKET.operator.
    for key in ("share_socket", "fast_socket", "operator_token_file"):
        path = config.get(key, config["socket"] + "." + key.split("_")[0])
        assert posixpath.dirname(path) == directory, f"{key} is not beside the socket"
    mount = _mount_of(container, directory)
    assert not mount.get("readOnly"), "the socket directory must be writable"
    volume = _volume(pod_spec, mount["name"])
    assert "hostPath" in volume, f"volume {volume['name']} is not a hostPath"
    assert volume["hostPath"]["path"] == directory, "the host path differs from the mount path"
    assert volume["hostPath"].get("type") == "DirectoryOrCreate"


def test_tls_files_come_from_the_secret(pod_spec, container, config):
    files = [config[k] for k in ("tls_cert_file", "tls_key_file", "tcp_token_file", "peer_ca_file")
             if k in config]
    assert files, "the config has no TLS files or token"
    directories = {posixpath.dirname(f) for f in files}
    assert len(directories) == 1, f"TLS files and token are in several directories: {files}"
    mount = _mount_of(container, directories.pop())
    # The daemon's container sees copies (mode 0600, its uid) that an init container makes from
    # the Secret volume into this shared volume.
    copiers = [c for c in pod_spec.get("initContainers", [])
               if mount["name"] in {m["name"] for m in c.get("volumeMounts", [])}]
    assert copiers, f"no init container fills volume {mount['name']}"
    secret_volumes = [_volume(pod_spec, m["name"]) for c in copiers for m in c["volumeMounts"]
                      if "secret" in _volume(pod_spec, m["name"])]
    assert secret_volumes, "the init container mounts no Secret"
    secret_files = {item["path"] for v in secret_volumes for item in v["secret"].get("items", [])}
    for path in files:
        assert posixpath.basename(path) in secret_files, f"no Secret item gives {path}"


def test_configmap_is_mounted_where_the_entrypoint_reads_it(pod_spec, container, configmap):
    config_path = entrypoint_config_path()
    overrides = container.get("command", []) + container.get("args", [])
    assert not any(a.startswith("--config") for a in overrides), "the container overrides --config"
    assert "command" not in container, "the container replaces the image's ENTRYPOINT"
    mount = _mount_of(container, posixpath.dirname(config_path))
    volume = _volume(pod_spec, mount["name"])
    assert volume.get("configMap", {}).get("name") == configmap["metadata"]["name"], \
        f"{mount['mountPath']} is not the ConfigMap {configmap['metadata']['name']}"
    items = volume["configMap"].get("items")
    file_of_key = {i["key"]: i["path"] for i in items} if items else {CONFIG_KEY: CONFIG_KEY}
    assert file_of_key.get(CONFIG_KEY) == posixpath.basename(config_path), \
        f"the ConfigMap's {CONFIG_KEY} does not land at {config_path}"


def test_memory_limit_is_above_the_budget(container, config):
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    budget = re.fullmatch(r"(\d+)([KMGT]?)", config.get("memory_budget", "1G").upper())
    assert budget, f"memory_budget {config.get('memory_budget')!r}"
    budget_bytes = int(budget.group(1)) * units[budget.group(2)]
    k8s_units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
                 "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}
    limit = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T|)",
                         str(container["resources"]["limits"]["memory"]))
    assert limit, f"memory limit {container['resources']['limits']['memory']!r}"
    limit_bytes = int(limit.group(1)) * k8s_units[limit.group(2)]
    assert limit_bytes >= 1.2 * budget_bytes, \
        f"memory limit {limit_bytes} leaves under 20% above memory_budget {budget_bytes}"


def test_probes_run_cachemgrctl_health_on_the_socket(container, config):
    for probe in ("readinessProbe", "livenessProbe"):
        command = container.get(probe, {}).get("exec", {}).get("command")
        assert command, f"{probe} is not an exec probe"
        assert command[:2] == ["/usr/local/bin/cachemgrctl", "health"], f"{probe}: {command}"
        assert f"--socket={config['socket']}" in command, f"{probe} checks another socket"


# --- The image -----------------------------------------------------------------------------------


def test_dockerfile_has_build_and_runtime_stages():
    froms = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert len(froms) >= 2, "the Dockerfile needs a build stage and a runtime stage"
    # Where the final stage puts each file it copies from another stage.
    installed = {}
    for word, rest in final_stage():
        args = [a for a in rest.split() if not a.startswith("--")]
        if word == "COPY" and "--from=" in rest and len(args) >= 2:
            for source in args[:-1]:
                name = posixpath.basename(source)
                installed[name] = posixpath.join(args[-1], name) if args[-1].endswith("/") \
                    or len(args) > 2 else args[-1]
    for binary in ("cachemgrd", "cachemgrctl"):
        assert installed.get(binary) == f"/usr/local/bin/{binary}", \
            f"the final stage does not copy {binary} from the build stage to /usr/local/bin"
    assert entrypoint()[0] == "/usr/local/bin/cachemgrd"


def test_image_user_is_the_daemonset_user(container):
    uid = image_uid()
    assert uid != 0, "the image runs as root"
    assert container["securityContext"]["runAsUser"] == uid, \
        f"the DaemonSet runs as {container['securityContext']['runAsUser']}, the image as {uid}"


def test_container_is_non_root_with_a_read_only_root(container):
    context = container["securityContext"]
    assert context.get("runAsNonRoot") is True
    assert context.get("runAsUser", 0) != 0
    assert context.get("readOnlyRootFilesystem") is True
    assert context.get("allowPrivilegeEscalation") is False
    assert "ALL" in context.get("capabilities", {}).get("drop", [])


# --- The config against the real daemon ----------------------------------------------------------


def test_every_config_key_is_a_daemon_flag(config_text, config, daemon_flags):
    unknown = sorted(set(config) - daemon_flags)
    assert not unknown, f"cachemgrd has no flags {unknown}"
    assert "config" not in config, "`config` is a command-line flag only"
    unknown = sorted(set(commented_settings(config_text)) - daemon_flags)
    assert not unknown, f"commented-out settings name no flag: {unknown}"


def _make_tls_files(directory):
    """A self-signed certificate for 127.0.0.1, its key and a token, as the daemon wants them."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed (scripts/install-deps.sh installs it)"
    cert, key, token = directory / "server.pem", directory / "server.key", directory / "token"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    token.write_text(os.urandom(16).hex())
    for secret in (key, token):
        secret.chmod(0o600)
    return {"tls_cert_file": cert, "tls_key_file": key, "tls_client_ca_file": cert,
            "peer_ca_file": cert, "tcp_token_file": token}


def _local_config(config_text, directory):
    """The config with every node path moved into `directory` and listeners on free ports."""
    tls = _make_tls_files(directory)
    moved = {}
    lines = []
    for key, value in parse_config(config_text):
        if key in ("socket", "share_socket", "fast_socket", "operator_token_file"):
            value = str(directory / posixpath.basename(value))
        elif key in ("tcp_address", "metrics_address"):
            value = "127.0.0.1:0"  # the daemon logs the port it got
        elif key in tls:
            value = str(tls[key])
        moved[key] = value
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n", moved


def _wait_serving(process, log_path, timeout=20.0):
    """The daemon's `cachemgrd serving` log record, once it has one."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line still being written, or not a log record
                continue
            if isinstance(record, dict) and record.get("msg") == "cachemgrd serving":
                return record
        if process.poll() is not None:
            pytest.fail(f"cachemgrd exited with {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"cachemgrd did not serve within {timeout} s:\n{log_path.read_text()}")


def test_config_starts_the_daemon(config_text, container):
    # A short directory: Unix socket paths hold 107 bytes.
    directory = pathlib.Path(tempfile.mkdtemp(prefix="cm-deploy-"))
    try:
        text, moved = _local_config(config_text, directory)
        assert "socket" in moved, "the config must name the socket"
        conf = directory / CONFIG_KEY
        conf.write_text(text)
        # The image's command line with this file, and whatever the DaemonSet adds.
        argv = [_cachemgrd()] + [f"--config={conf}" if a.startswith("--config=") else a
                                 for a in entrypoint()[1:]] + container.get("args", [])
        log_path = directory / "daemon.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            serving = _wait_serving(process, log_path)
            socket_path = moved["socket"]
            assert os.path.exists(socket_path), "serving, but no socket"
            if "metrics_address" in moved:
                url = f"http://127.0.0.1:{serving['metrics_port']}/metrics"
                with urllib.request.urlopen(url, timeout=10) as reply:
                    assert reply.status == 200 and b"cachemgr" in reply.read()
            if "tcp_address" in moved:
                assert re.search(r" port \d+ TLS$", serving.get("tcp", "")), serving.get("tcp")
            _run_probes_and_tcp_health(container, serving, moved)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                returncode = process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise
        assert returncode == 0, f"cachemgrd exited with {returncode}:\n{log_path.read_text()}"
        assert not os.path.exists(moved["socket"]), "SIGTERM left the socket behind"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run_probes_and_tcp_health(container, serving, moved):
    """The DaemonSet's probes, then health over TCP with the TLS files and the token."""
    cachemgrctl = os.environ.get("CACHEMGRCTL")
    if not cachemgrctl:
        return  # the daemon came up; the probe command needs the cachemgrctl binary
    for probe in ("readinessProbe", "livenessProbe"):
        command = list(container[probe]["exec"]["command"])
        command[0] = cachemgrctl
        command = [re.sub(r"^--socket=.*", f"--socket={moved['socket']}", a) for a in command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{probe} {shlex.join(command)}: {done.stdout}{done.stderr}"
    if "tcp_address" in moved:
        port = re.search(r" port (\d+) ", serving["tcp"]).group(1)
        command = [cachemgrctl, "health", f"--address=127.0.0.1:{port}",
                   f"--token_file={moved['tcp_token_file']}",
                   f"--tls_ca_file={moved['tls_cert_file']}", "--timeout=10"]
        if "tls_client_ca_file" in moved:  # mutual TLS: the self-signed pair is the client too
            command += [f"--tls_cert_file={moved['tls_cert_file']}",
                        f"--tls_key_file={moved['tls_key_file']}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{shlex.join(command)}: {done.stdout}{done.stderr}"
