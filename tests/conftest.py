"""Shared fixtures: environment for local Ray, and a real S3 server on loopback (moto)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest

# Ray's socket paths are capped at 107 bytes: keep its temp dir short (never pytest's tmp_path).
_RAY_TMP = tempfile.mkdtemp(prefix="f2m", dir="/tmp")
os.environ.setdefault("RAY_TMPDIR", _RAY_TMP)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the test session (started on first use, ended at the end)."""
    import ray

    from f2m_ray.runtime.cluster import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """A briefly trained `tiny` checkpoint with its bank (test_synthesize.train_checkpoint), made once a session."""
    from test_synthesize import make_bank, train_checkpoint

    checkpoint = train_checkpoint(str(tmp_path_factory.mktemp("trained") / "ckpt"))
    make_bank(checkpoint)
    return checkpoint


@pytest.fixture()
def one_torch_thread():
    """Small convolutions run no faster on two threads, and much slower on a busy machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free loopback port; sets the AWS variables the tool reads."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto S3 server did not start")
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh, empty bucket on the loopback S3 server: yields 's3://NAME'."""
    import s3fs

    name = f"f2m-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(name)
    yield f"s3://{name}"


def pytest_collection_modifyitems(items):
    """The tests on the `ray start` cluster run last: the cluster (three raylets and their agents) then
    lives only while it is used, not beside the rest of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)  # stable: file order kept


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_RAY_TMP, ignore_errors=True)


# ---------------------------------------------------------------- a real Ray cluster on this machine


def _http_json(url: str, timeout: float = 2.0):
    import json

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _children(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    from pathlib import Path

    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _kill(pids: list[int]) -> None:
    """SIGKILL each of `pids` that is still there."""
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _submit_or_none(client, entrypoint: str) -> str | None:
    try:
        return client.submit_job(entrypoint=entrypoint)
    except RuntimeError as err:  # "No available agent to submit job, please try again later"
        if "try again" in str(err):
            return None
        raise


@pytest.fixture(scope="session")
def ray_cluster():
    """One `ray start` cluster for the session's cluster and fault tests: a head with no CPUs and two
    worker nodes of 2 CPUs (a fault test that takes a node away puts a fresh one in its place)."""
    cluster = LocalCluster(head_cpus=0)
    try:
        cluster.add_node(cpus=2)  # one at a time: two nodes booting at once did not always both join
        cluster.add_node(cpus=2)
        cluster.wait_for_jobs()
        yield cluster
    finally:
        cluster.stop()


class LocalCluster:
    """A Ray cluster as `ray start` makes one: a head (with the job server) and worker nodes on loopback.

    Every node is a `ray start --block` process; ending that process (SIGTERM) ends what it
    started, so the cluster is ended by its own PIDs, never by `ray stop`. `kill_node` takes a
    node away without grace: its raylet is SIGKILLed (its workers die with it), as when a
    machine is lost.
    """

    def __init__(self, head_cpus: int = 0):
        self.temp = tempfile.mkdtemp(prefix="f2mk", dir="/tmp")  # Ray's socket paths: keep them short
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []
        self._started = 0
        self.head = self._start(["--head", "--port", str(self.port), "--dashboard-port", str(self.dashboard_port),
                                 "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
                                 "--ray-client-server-port", str(_free_port()), "--num-cpus", str(head_cpus)])
        self._wait(lambda: _http_json(f"{self.dashboard}/api/version") and self.alive_nodes() == 1, "the head")

    def _start(self, args: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.temp, f"ray-start-{self._started}.log"), "w")
        self._started += 1
        # Every node on this machine needs ports of its own: the agents' defaults (52365, ...) would
        # collide between nodes.
        ports = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                          "runtime-env-agent-port", "metrics-export-port",
                                                          "node-manager-port", "object-manager-port")]
        return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--temp-dir", self.temp,
                                 "--disable-usage-stats", *ports, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _wait(self, probe, what: str, seconds: float = 90.0):
        deadline = time.time() + seconds
        while True:
            try:
                result = probe()
                if result:
                    return result
            except OSError:
                pass
            if time.time() > deadline or self.head.poll() is not None:
                raise RuntimeError(f"{what} did not come up within {seconds:.0f} s (logs in {self.temp})")
            time.sleep(0.5)

    def wait_for_jobs(self, seconds: float = 120.0) -> None:
        """Until the head's job agent takes a job (it comes up after the job server answers)."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.dashboard)
        job = self._wait(lambda: _submit_or_none(client, "python -c pass"), "the job agent", seconds)
        self._wait(lambda: client.get_job_status(job) in (JobStatus.SUCCEEDED, JobStatus.FAILED), "a first job", seconds)

    def alive_nodes(self) -> int:
        nodes = _http_json(f"{self.dashboard}/nodes?view=summary")["data"]["summary"]
        return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")

    def add_node(self, cpus: int) -> subprocess.Popen:
        node = self._start(["--address", self.address, "--num-cpus", str(cpus)])
        self.nodes.append(node)
        self._wait(lambda: self.alive_nodes() == 1 + len(self.nodes), "a worker node")
        return node

    def processes(self, node: subprocess.Popen, name: str) -> list[int]:
        """PIDs below `node` whose command line holds `name` (e.g. an actor's class name)."""
        return [p for p in _children(node.pid) if name in command_line(p)]

    def kill_node(self, node: subprocess.Popen) -> None:
        """The node is lost: its raylet SIGKILLed (its workers see it go and exit), then the rest of it ended."""
        _kill(self.processes(node, "raylet/raylet"))
        _kill([*_children(node.pid), node.pid])  # the rest of it, as abruptly
        node.wait()
        self.nodes.remove(node)

    def stop(self) -> None:
        """Every process of the cluster SIGKILLed: nothing of it is kept, so nothing needs a graceful end."""
        everything = [*self.nodes, self.head]
        _kill([pid for node in everything for pid in _children(node.pid)] + [node.pid for node in everything])
        for node in everything:
            node.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


class S3Outage:
    """A TCP forwarder in front of the S3 server: point AWS_ENDPOINT_URL at `endpoint`, then `cut()`
    (every open connection reset, new ones refused, as when the store goes away) and `restore()`
    (the same port again). The server behind it keeps its data, so a resume finds what was written.
    """

    def __init__(self, target: str):
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for sock in list(self._open):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
                    sock.close()
                except OSError:
                    pass
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self._listener is not listener:
                client.close()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with self._lock:
                    self._open.discard(sock)
                try:
                    sock.close()
                except OSError:
                    pass
