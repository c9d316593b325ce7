"""Faults: something is taken away mid-run and the outcome is checked byte for byte.

    a node lost without grace during `synthesize`   -> exactly N rows, the bytes of an undisturbed run
    a node lost during `encode`                     -> the same bank
    a training worker killed mid-run                -> restart from the last checkpoint, each epoch once;
                                                       past --max-failures: one line naming the checkpoint
    the S3 server gone mid-synthesis / mid-training -> one line, exit 1, nothing that looks finished;
                                                       synthesis, S3 back: --resume finishes with the bytes of
                                                       an undisturbed run; training: S3 holds a whole
                                                       checkpoint to resume from, each epoch once

The node faults run on a cluster of `ray start` processes on this machine (a head with no
CPUs, two worker nodes of 2 CPUs), the commands as users run them, in their own processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import LocalCluster, S3Outage, _children, command_line
from f2m_ray.bank import load_feature_bank
from f2m_ray.checkpoint import find_checkpoint, load_checkpoint
from f2m_ray.synth.driver import synthesize
from f2m_ray.synth.plan import SynthesisConfig
from f2m_ray.train.options import fresh_listing
from f2m_ray.train.report import read_metrics

CATEGORY = "spiculated-irregular"
# Every candidate fails an impossible distance guard, so each mass decodes 4 candidates: a file
# takes long enough (about 1 s) for a fault to land mid-run. The guard is part of the run's bytes.
SLOW = ["--min-seed-distance", "5", "--max-attempts", "4"]
N, ROWS_PER_FILE = 1600, 100  # 16 files: a fault lands with most of the run still to do

pytestmark = [pytest.mark.faults, pytest.mark.ray, pytest.mark.slow]


def f2m(args: list[str], cwd, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "f2m_ray_cli", *args], cwd=cwd, env=env or dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, seconds: float = 120.0):
    deadline = time.time() + seconds
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stdout.read()}{proc.stderr.read()}")
        assert time.time() < deadline, f"no {what} within {seconds:.0f} s"
        time.sleep(0.05)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.parquet"))}


# ---------------------------------------------------------------- nodes lost


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray_cluster


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> dict[str, bytes]:
    """The Parquet files of the faults' synthesis run left alone: the same actor code in this process
    (its bytes equal those of any actor count)."""
    out = tmp_path_factory.mktemp("undisturbed") / "calm"
    synthesize(SynthesisConfig(categories=(CATEGORY,), n=N, out=str(out), model="pretrained",
                               rows_per_file=ROWS_PER_FILE, min_seed_distance=5.0, max_attempts=4,
                               executor="in-process"), report=None)
    return tree(out)


def kill_the_node_running(cluster: LocalCluster, actor: str) -> None:
    """Take away (without grace) a worker node on which an `actor` process runs; put a fresh node in its place."""
    node = next(n for n in cluster.nodes if cluster.processes(n, actor))
    cluster.kill_node(node)
    cluster.add_node(cpus=2)


@pytest.mark.cluster
def test_a_node_lost_mid_synthesis_leaves_exactly_the_bytes_of_an_undisturbed_run(cluster, undisturbed, tmp_path):
    args = ["synthesize", "--model", "pretrained", "--category", CATEGORY, "--n", str(N), "--rows-per-file",
            str(ROWS_PER_FILE), "--workers", "2", *SLOW]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    proc = f2m([*args, "--out", "lost"], tmp_path, env)
    folder = tmp_path / "lost" / "data" / CATEGORY
    wait_for(lambda: folder.is_dir() and len(list(folder.glob("part-*.parquet"))) >= 4, "4 finished files", proc)
    kill_the_node_running(cluster, "ShardSynthesizer")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"wrote {N} masses in 16 files" in stdout and "joined the Ray cluster" in stderr, stdout + stderr
    manifest = json.loads((tmp_path / "lost" / "_manifest.json").read_text())
    assert manifest["counts"] == {CATEGORY: N}
    ids = [i for f in sorted(folder.glob("*.parquet")) for i in pq.read_table(f, columns=["sample_id"])["sample_id"].to_pylist()]
    assert len(ids) == len(set(ids)) == N
    assert tree(tmp_path / "lost") == undisturbed


@pytest.mark.cluster
def test_a_node_lost_mid_encoding_leaves_the_same_bank(cluster, tmp_path, ray_local):
    from f2m_ray.encode import build_feature_bank

    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    proc = f2m(["encode", "--model", "pretrained", "--data", "phantom:2000", "--out", "lost.parquet"], tmp_path, env)
    wait_for(lambda: any(cluster.processes(n, "_Encoder") for n in cluster.nodes), "an encoder actor", proc)
    time.sleep(1.0)  # let it take its first batches
    kill_the_node_running(cluster, "_Encoder")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    calm = build_feature_bank("pretrained", "phantom:2000", out=str(tmp_path / "calm.parquet"))  # this session's Ray
    lost, reference = load_feature_bank(str(tmp_path / "lost.parquet")), load_feature_bank(calm)
    assert len(lost.roi_id) == 2000 and list(lost.roi_id) == list(reference.roi_id)
    assert np.array_equal(lost.features, reference.features) and lost.bank_id == reference.bank_id


# ---------------------------------------------------------------- a training worker lost


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _train_workers(proc: subprocess.Popen) -> list[int]:
    return [p for p in _children(proc.pid) if "RayTrainWorker" in command_line(p)]


def test_a_killed_worker_restarts_from_its_checkpoint_and_one_loss_too_many_stops_naming_it(tmp_path):
    """`f2m-ray train` (tiny, checkpoint every epoch, one restart allowed) in its own process: a Ray Train
    worker SIGKILLed once epoch 2 is checkpointed restarts the run from a checkpoint; a worker of the
    restarted group killed too is one loss more than allowed, and the run stops in one line naming its
    last checkpoint."""
    proc = f2m(["train", "--preset", "tiny", "--data", "phantom:200", "--checkpoint-every", "1", "--storage", "runs",
                "--name", "lost", "--no-bank", "--epochs", "16", "--max-failures", "1"], tmp_path)
    run_dir = str(tmp_path / "runs" / "lost")

    def restarts() -> list[dict]:
        return [r for r in read_metrics(run_dir, events=True) if r.get("event") == "restart"]

    try:
        # Ray Train's record of its checkpoints, not the folder: a worker lost between the folder's upload
        # and its registration restarts from the checkpoint before.
        wait_for(lambda: "checkpoint_epoch_000002" in _read(os.path.join(run_dir, "checkpoint_manager_snapshot.json")),
                 "epoch 2's checkpoint registered", proc, seconds=240)
        first = _train_workers(proc)
        assert len(first) == 2, [command_line(p) for p in _children(proc.pid)]
        os.kill(first[1], 9)
        wait_for(lambda: restarts(), "the restart", proc, seconds=120)
        restart = restarts()[0]
        # The restarted group at work: an epoch after the one it came back to is logged again.
        wait_for(lambda: any(r.get("epoch", 0) > restart["from_epoch"] for r in
                             read_metrics(run_dir, events=True)[read_metrics(run_dir, events=True).index(restart):]),
                 "an epoch after the restart", proc, seconds=120)
        second = [p for p in _train_workers(proc) if p not in first]
        assert len(second) == 2, [command_line(p) for p in _children(proc.pid)]
        os.kill(second[0], 9)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    lost_at, resumed_from = restart["lost_at_epoch"], restart["from_epoch"]
    assert f"worker lost at epoch {lost_at}: restarting from checkpoint epoch {resumed_from}, 1 of 1 restarts used" \
        in stdout.splitlines(), stdout
    assert 1 <= resumed_from < lost_at <= 16  # the restart came back to a checkpoint it had, not to epoch 0
    epochs = [r["epoch"] for r in read_metrics(run_dir)]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) > resumed_from  # each once, re-run ones replaced
    assert [e["event"] for e in read_metrics(run_dir, events=True) if "event" in e] == ["start", "restart"]
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and "Traceback" not in stderr and "core_worker.cc" not in stdout + stderr, stderr
    assert len(errors) == 1 and "training failed after 1 of 1 restarts" in errors[0], stderr
    named = re.search(r"the last checkpoint is (\S+) \(epoch (\d+)\): the same command resumes from it$", errors[0])
    assert named and named[1] == f"{run_dir}/checkpoint_epoch_{int(named[2]):06d}", errors[0]
    assert os.path.isdir(named[1]) and resumed_from <= int(named[2]) <= len(epochs)


# ---------------------------------------------------------------- S3 gone and back


@pytest.fixture()
def outage(s3_server):
    return S3Outage(s3_server)


def secret_env(outage: S3Outage) -> tuple[dict[str, str], str]:
    """The commands' environment: S3 through the outage, and a secret key that must end up nowhere
    (the loopback server does not check signatures, so any key works)."""
    sentinel = "SENTINEL-5ecret-" + os.urandom(6).hex()
    return {**os.environ, "AWS_ENDPOINT_URL": outage.endpoint, "AWS_SECRET_ACCESS_KEY": sentinel}, sentinel


def assert_written_nowhere(sentinel: str, console: str, bucket: str, prefix: str, local: Path) -> None:
    """Not in the console, not in any object under s3://bucket/prefix, not in any file under `local`."""
    assert sentinel not in console
    stored = objects(bucket, prefix)
    assert stored and [key for key, data in stored.items() if sentinel.encode() in data] == []
    files = [p for p in local.rglob("*") if p.is_file()]
    assert [p for p in files if sentinel.encode() in p.read_bytes()] == []


def objects(bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under s3://bucket/prefix, read from the server directly (not through the outage)."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
    return {key[len(f"{bucket}/{prefix}/"):]: fs.cat_file(key) for key in fs.find(f"{bucket}/{prefix}")}


@pytest.mark.s3
def test_s3_gone_mid_synthesis_is_one_line_and_resume_finishes_the_same_bytes(outage, s3_bucket, undisturbed, tmp_path):
    bucket = s3_bucket[len("s3://"):]
    args = ["synthesize", "--model", "pretrained", "--category", CATEGORY, "--n", str(N), "--rows-per-file",
            str(ROWS_PER_FILE), "--out", f"{s3_bucket}/syn", *SLOW]
    env, sentinel = secret_env(outage)
    proc = f2m(args, tmp_path, env)
    wait_for(lambda: sum(k.endswith(".parquet") for k in objects(bucket, "syn")) >= 3, "3 files on S3", proc)
    outage.cut()
    start = time.time()
    stdout, stderr = proc.communicate(timeout=120)
    console = stdout + stderr
    lines = error_lines(stderr)
    assert proc.returncode == 1 and time.time() - start < 60, stderr
    assert lines[-1].startswith("Error: synthesis failed: ") and "finished files are kept, run again with --resume" \
        in lines[-1], stderr
    assert "Traceback" not in stderr and "_manifest.json" not in objects(bucket, "syn")
    outage.restore()
    resumed = f2m([*args, "--resume"], tmp_path, env)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "kept" in stdout, stderr
    assert_written_nowhere(sentinel, console + stdout + stderr, bucket, "syn", tmp_path)
    on_s3 = {k: v for k, v in objects(bucket, "syn").items() if k.endswith(".parquet")}
    assert on_s3 == undisturbed and len(on_s3) == 16


@pytest.mark.s3
def test_s3_gone_mid_training_is_one_line_and_leaves_a_checkpoint_to_resume_from(outage, s3_bucket, tmp_path):
    args = ["train", "--preset", "tiny", "--data", "phantom:200", "--epochs", "5", "--checkpoint-every", "1",
            "--storage", f"{s3_bucket}/runs", "--name", "gone", "--max-failures", "0", "--no-bank", "--workers", "1"]
    env, sentinel = secret_env(outage)
    proc = f2m(args, tmp_path, env)

    def epochs() -> list[int]:  # read from the server directly, as the run left them
        fresh_listing(f"{s3_bucket}/runs/gone")  # s3fs caches listings: another process writes there
        try:
            return [r["epoch"] for r in read_metrics(f"{s3_bucket}/runs/gone")]
        except (OSError, ValueError):
            return []

    # Epoch 2 logged: epoch 1's checkpoint was reported (uploaded) before epoch 2 began.
    wait_for(lambda: 2 in epochs(), "epoch 2 on S3", proc, seconds=240)
    outage.cut()
    start = time.time()
    stdout, stderr = proc.communicate(timeout=240)
    console = stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and time.time() - start < 120 and "Traceback" not in stderr, stderr
    assert len(errors) == 1 and "training failed" in errors[0], stderr
    assert "once the storage answers, the same command resumes from the last one" in errors[0], errors[0]
    # What the run left on S3 is what a resume starts from: a whole checkpoint with optimizer state, and
    # each finished epoch once in the metrics (resuming from one: test_train's resumed run, the worker-loss test).
    outage.restore()
    run_dir = f"{s3_bucket}/runs/gone"
    last = find_checkpoint(run_dir)
    done = epochs()
    assert done == list(range(1, len(done) + 1)) and last.startswith(f"{run_dir}/checkpoint_epoch_00000"), (done, last)
    assert load_checkpoint(run_dir, with_optimizer=True).optim_state is not None
    # With S3 back, the same command resumes from that checkpoint and finishes: each epoch logged once.
    resumed = f2m(args, tmp_path, env)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"resuming run {run_dir} from epoch {int(last[-6:])} ({last})" in stdout, stderr
    assert epochs() == [1, 2, 3, 4, 5] and find_checkpoint(run_dir).endswith("checkpoint_epoch_000005")
    assert_written_nowhere(sentinel, console + stdout + stderr, s3_bucket[len("s3://"):], "runs", tmp_path)
