"""A real `redis-server` for tests: a free loopback port, a temp dir, no persistence, started and stopped.

Use the `redis_server` fixture (import `redis_server_fixture` into a test module, or into a conftest), or
`RedisServer` directly for a custom one (`RedisServer(password="pw")`, `RedisServer(tls=True)`), as a
context manager.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
POLL_S = 0.01
# A freshly chosen port can be taken by someone else before redis binds it: pick another this often.
START_ATTEMPTS = 3
OPENSSL = shutil.which("openssl")


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process; `restart()` keeps its port (and, without persistence, loses its data)."""

    def __init__(self, password: str | None = None, port: int | None = None, tls: bool = False) -> None:
        if not os.path.exists(REDIS_SERVER):
            pytest.skip(f"redis-server not found at {REDIS_SERVER}")
        if tls and OPENSSL is None:
            pytest.skip("openssl not found (needed for a TLS redis-server)")
        self.password = password
        self.tls = tls
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.dir = tempfile.mkdtemp(prefix="aegaeon-redis-")
        self.process: subprocess.Popen | None = None
        self.cert = os.path.join(self.dir, "cert.pem")  # self-signed for 127.0.0.1; the client's CA too
        if tls:
            self._make_certificate()

    @property
    def url(self) -> str:
        """redis://[:password@]127.0.0.1:port/0, or rediss://...?ssl_ca_certs=CERT with TLS."""
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        if self.tls:
            query = urllib.parse.urlencode({"ssl_ca_certs": self.cert})
            return f"rediss://{auth}{LOOPBACK}:{self.port}/0?{query}"
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it and return once it answers PING."""
        for attempt in range(START_ATTEMPTS):
            self._spawn()
            if self._wait_ready():
                return self
            self._kill()
            if self._fixed_port or attempt == START_ATTEMPTS - 1:
                break
            self.port = free_port()
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._kill()
            self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self._fixed_port = True
        self.start()

    def close(self) -> None:
        """Stop it and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as log:
                return log.read()[-4000:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> None:
        if self.tls:
            ports = [
                "--port", "0",  # TLS only
                "--tls-port", str(self.port),
                "--tls-auth-clients", "no",
                "--tls-cert-file", self.cert,
                "--tls-key-file", self._key_file,
                "--tls-ca-cert-file", self.cert,
            ]  # fmt: skip
        else:
            ports = ["--port", str(self.port)]
        args = [
            REDIS_SERVER,
            *ports,
            "--bind", LOOPBACK,
            "--dir", self.dir,
            # No persistence: nothing to clean up, and a restart starts empty (what the tests exercise).
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            args, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )

    @property
    def _key_file(self) -> str:
        return os.path.join(self.dir, "key.pem")

    def _make_certificate(self) -> None:
        subprocess.run(
            [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", self._key_file, "-out", self.cert,
             "-subj", f"/CN={LOOPBACK}", "-addext", f"subjectAltName=IP:{LOOPBACK}"],
            check=True, capture_output=True,
        )  # fmt: skip

    def _wait_ready(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    return False  # exited: most likely the port was taken
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(POLL_S)
            return False
        finally:
            client.close()

    def _kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture(name="redis_server")
def redis_server_fixture() -> Iterator[RedisServer]:
    """A fresh redis-server (no password) for one test, stopped after it."""
    with RedisServer() as server:
        yield server
