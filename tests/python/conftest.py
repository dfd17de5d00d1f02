"""Fixtures of the Python tests that need a running cachemgrd (the real binary at $CACHEMGRD)."""

import os
import pathlib
import signal
import socket
import subprocess
import tempfile
import time

import pytest


def _wait_for_socket(path, process, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"cachemgrd exited with {process.returncode}")
        if os.path.exists(path):
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(path)
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"cachemgrd did not listen on {path} within {timeout} s")


class Daemon:
    def __init__(self, args=()):
        binary = os.environ.get("CACHEMGRD")
        if not binary:
            raise RuntimeError("set CACHEMGRD to the cachemgrd binary")
        self.dir = tempfile.TemporaryDirectory(prefix="cachemgr-py-")
        self.socket = os.path.join(self.dir.name, "cachemgr.sock")
        self.log_path = os.path.join(self.dir.name, "daemon.log")
        self.log = open(self.log_path, "w")
        self.argv = [binary, f"--socket={self.socket}", *args]
        self._spawn()

    def _spawn(self):
        self.process = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            _wait_for_socket(self.socket, self.process)
        except Exception:
            self.stop()
            raise

    def kill(self):
        """SIGKILL: no shutdown, the sockets stay behind as a crash leaves them."""
        self.process.kill()
        self.process.wait()

    def restart(self):
        """Starts the daemon again on the same socket and log after kill()."""
        assert self.process.poll() is not None, "the daemon still runs"
        self._spawn()

    def log_text(self):
        return pathlib.Path(self.log_path).read_text()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        self.dir.cleanup()


@pytest.fixture
def daemon():
    d = Daemon()
    yield d
    d.stop()


@pytest.fixture
def daemon_factory():
    started = []

    def start(*args):
        d = Daemon(args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
