"""Fixtures: a private redis-server and a real gateway, both started here and stopped by PID;
for the cluster tests, a private Redis Cluster (3 masters, 3 replicas) and a gateway on it.

Nothing here touches a Redis someone else started (not even the one on 6379). Every wait is
bounded, so a broken gateway fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.sync.client import ClientConnection, connect

REPO = Path(__file__).resolve().parents[3]
JWT_SECRET = "py-tests-" + secrets.token_hex(16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Terminate a process we started, by PID; kill it if it ignores SIGTERM."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Drain(threading.Thread):
    """Keeps reading a pipe (a full pipe would block the child) and keeps the tail."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: deque[str] = deque(maxlen=200)

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            self.lines.append(raw.decode(errors="replace").rstrip())


@pytest.fixture(scope="session")
def redis_port() -> Iterator[int]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server not found on PATH (scripts/test installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server on port {port} did not come up")
                time.sleep(0.05)
        client.close()
        yield port
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def redis_url(redis_port: int) -> str:
    return f"redis://127.0.0.1:{redis_port}"


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5, decode_responses=True)
    yield client
    client.close()


class Gateway:
    def __init__(self, bin_path: str, port: int, proc: subprocess.Popen, out: Drain, err: Drain):
        self.bin = bin_path
        self.port = port
        self.proc = proc
        self.out = out
        self.err = err

    def logs(self) -> str:
        return "\n".join(list(self.out.lines) + list(self.err.lines)[-40:])

    def token(self, project: str, sub: str = "u") -> str:
        res = subprocess.run(
            [self.bin, "token", "--sub", sub, "--project", project],
            env={**os.environ, "SWITCHBOARD_JWT_SECRET": JWT_SECRET},
            capture_output=True,
            timeout=20,
            check=True,
        )
        return res.stdout.decode().strip()

    def connect(self, project: str) -> Client:
        stack = contextlib.ExitStack()
        # entered as a context manager: the one form every websockets>=12 accepts silently
        ws = stack.enter_context(
            connect(
                f"ws://127.0.0.1:{self.port}/ws/{project}?token={self.token(project)}",
                open_timeout=10,
                close_timeout=2,
                max_size=2**22,
            )
        )
        client = Client(ws, stack)
        hello = client.recv()
        assert hello["type"] == "connection.established", hello
        client.established = hello
        return client


class Client:
    """A browser stand-in: JSON frames in and out, every receive bounded."""

    def __init__(self, ws: ClientConnection, stack: contextlib.ExitStack) -> None:
        self.ws = ws
        self._stack = stack
        self.established: dict = {}

    def recv(self, timeout: float = 10.0) -> dict:
        """The next frame, skipping `status` snapshots and heartbeats."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no frame within {timeout:.1f}s")
            frame = json.loads(self.ws.recv(timeout=left))
            if frame.get("type") not in ("status", "system.heartbeat"):
                return frame

    def send(self, message: dict) -> None:
        self.ws.send(json.dumps(message))

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def gateway(redis_url: str) -> Iterator[Gateway]:
    yield from run_gateway({"REDIS_URL": redis_url})


# The gateway refuses two Redis topologies at once: it gets only the one a fixture names.
_TOPOLOGY_ENV = ("REDIS_URL", "REDIS_CLUSTER_NODES", "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER")


def run_gateway(redis_env: dict[str, str]) -> Iterator[Gateway]:
    """Starts the gateway with `redis_env` as its Redis settings, yields it once ready, and
    stops it by PID."""
    bin_path = os.environ.get("SWITCHBOARD_BIN", str(REPO / "target" / "debug" / "switchboard"))
    if not os.access(bin_path, os.X_OK):
        pytest.fail(f"gateway binary {bin_path} missing (run `cargo build` or set SWITCHBOARD_BIN)")
    env = {k: v for k, v in os.environ.items() if k not in _TOPOLOGY_ENV}
    env.update(redis_env)
    env.update(
        {
            "SWITCHBOARD_LISTEN": "127.0.0.1:0",
            "SWITCHBOARD_JWT_SECRET": JWT_SECRET,
            "ENVIRONMENT": "development",
        }
    )
    proc = subprocess.Popen([bin_path], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = Drain(proc.stderr)
    err.start()
    try:
        # The first stdout line names the bound port; read it with a bound on the wait.
        first: list[bytes] = []
        reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=30)
        line = first[0].decode().strip() if first else ""
        prefix = "switchboard listening on 127.0.0.1:"
        if not line.startswith(prefix):
            pytest.fail(
                f"gateway did not announce its port (got {line!r}):\n" + "\n".join(err.lines)
            )
        port = int(line[len(prefix) :])
        out = Drain(proc.stdout)
        out.start()
        gw = Gateway(bin_path, port, proc, out, err)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as res:
                    if res.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("gateway never became ready:\n" + gw.logs())
            time.sleep(0.1)
        yield gw
    finally:
        stop(proc)


@pytest.fixture
def project() -> str:
    """A fresh project id per test, so seqs start at 1 and tests do not interfere."""
    return "py-" + secrets.token_hex(6)


@pytest.fixture
def publisher(redis_url: str):
    from switchboard_publisher import FunctionRunnerEventPublisher

    pub = FunctionRunnerEventPublisher("runner-py", redis_url)
    yield pub
    pub._redis.close()


# ---------------------------------------------------------------------------- Redis Cluster


def _info(port: int, what: str) -> dict[str, Any]:
    """`INFO <what>` of a node, or `CLUSTER INFO` when `what` is "cluster", as a dict; {} when
    the node does not answer."""
    try:
        client = redis.Redis(
            port=port, socket_connect_timeout=1, socket_timeout=2, decode_responses=True
        )
        try:
            if what == "cluster":
                return dict(client.execute_command("CLUSTER INFO"))
            return dict(client.execute_command("INFO", what))
        finally:
            client.close()
    except redis.RedisError:
        return {}


def _until(what: str, seconds: float, check: Any, describe: Any) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{describe()}")
        time.sleep(0.1)


class RedisClusterNodes:
    """Six cluster-enabled redis-servers (3 masters, 3 replicas), each in its own directory,
    started and stopped (by PID) here."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="sb-py-cluster-")

    @property
    def addrs(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server not found on PATH (scripts/test installs it)")
        # 12 distinct ports: each node's and its cluster bus's (chosen too: the default,
        # port + 10000, can be past 65535 for a port in the ephemeral range).
        ports: set[int] = set()
        while len(ports) < 12:
            ports.add(free_port())
        chosen = sorted(ports)
        for i in range(6):
            port, bus = chosen[2 * i], chosen[2 * i + 1]
            node_dir = Path(self.tmp.name) / f"node-{port}"
            node_dir.mkdir()
            args = [
                exe,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(bus),
                "--cluster-node-timeout", "1500",
                "--repl-diskless-sync-delay", "0",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(node_dir),
            ]  # fmt: skip
            # The log goes to a file in the node's directory: no pipe to drain.
            with open(node_dir / "redis.log", "wb") as log:
                proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=node_dir)
            self.procs.append(proc)
            self.ports.append(port)

        def all_answer() -> bool:
            for port, proc in zip(self.ports, self.procs):
                if proc.poll() is not None:
                    pytest.fail(f"redis-server on port {port} exited:\n{self.describe()}")
            return all(_info(port, "server") for port in self.ports)

        _until("every redis-server to answer", 10, all_answer, self.describe)
        create = ["redis-cli", "--cluster", "create", *self.addrs]
        res = subprocess.run(
            [*create, "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, timeout=60
        )
        if res.returncode != 0:
            pytest.fail(
                "redis-cli --cluster create failed:\n"
                + res.stdout.decode(errors="replace")
                + res.stderr.decode(errors="replace")
            )
        _until(
            "cluster_state:ok on every node",
            30,
            lambda: all(_info(p, "cluster").get("cluster_state") == "ok" for p in self.ports),
            self.describe,
        )

        def replicas_in_sync() -> bool:
            roles = [_info(p, "replication") for p in self.ports]
            replicas = [r for r in roles if r.get("role") == "slave"]
            return len(replicas) == 3 and all(r.get("master_link_status") == "up" for r in replicas)

        _until("every replica's master_link_status:up", 30, replicas_in_sync, self.describe)

    def describe(self) -> str:
        out = []
        for port in self.ports:
            state = _info(port, "cluster").get("cluster_state")
            role = _info(port, "replication").get("role")
            out.append(f"--- :{port} cluster_state={state} role={role}")
            log = Path(self.tmp.name) / f"node-{port}" / "redis.log"
            if log.exists():
                out.extend(log.read_text(errors="replace").splitlines()[-5:])
        return "\n".join(out)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.tmp.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A private Redis Cluster; its nodes' `host:port`s are `.addrs`."""
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli not found on PATH (it comes with redis-server)")
    nodes = RedisClusterNodes()
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="session")
def cluster_gateway(redis_cluster: RedisClusterNodes) -> Iterator[Gateway]:
    """A gateway on the private cluster: REDIS_CLUSTER_NODES, no REDIS_URL."""
    yield from run_gateway({"REDIS_CLUSTER_NODES": ",".join(redis_cluster.addrs)})


@pytest.fixture
def rc(redis_cluster: RedisClusterNodes) -> Iterator[Any]:
    """A cluster client for the tests' own reads."""
    from redis.cluster import ClusterNode, RedisCluster

    nodes = [ClusterNode("127.0.0.1", p) for p in redis_cluster.ports]
    client = RedisCluster(startup_nodes=nodes, socket_timeout=5, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def cluster_publisher(redis_cluster: RedisClusterNodes):
    """A publisher built from the seed nodes, as a worker would from REDIS_CLUSTER_NODES."""
    from switchboard_publisher import FunctionRunnerEventPublisher

    pub = FunctionRunnerEventPublisher("runner-py", cluster_nodes=",".join(redis_cluster.addrs))
    yield pub
    pub.close()
