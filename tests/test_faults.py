"""Faults: something is taken away mid-run and the outcome is checked byte for byte.

    a node lost without grace during `synthesize`   -> exactly N rows, the bytes of an undisturbed run
    a node lost during `encode`                     -> the same bank
    a training worker killed mid-run                -> restart from the last checkpoint, each epoch once;
                                                       past --max-failures: one line naming the checkpoint
    the S3 server gone mid-synthesis / mid-training -> one line, exit 1, nothing that looks finished;
                                                       back again: --resume (or the same command) finishes
                                                       with the bytes (or the epochs) of an undisturbed run

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
from f2m_ray.train.report import read_metrics

CATEGORY = "spiculated-irregular"
# Every candidate fails an impossible distance guard, so each mass decodes 4 candidates: a file
# takes long enough (about 1 s) for a fault to land mid-run. The guard is part of the run's bytes.
SLOW = ["--min-seed-distance", "5", "--max-attempts", "4"]

pytestmark = [pytest.mark.faults, pytest.mark.ray]


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


def kill_the_node_running(cluster: LocalCluster, actor: str) -> None:
    """Take away (without grace) a worker node on which an `actor` process runs; put a fresh node in its place."""
    node = next(n for n in cluster.nodes if cluster.processes(n, actor))
    cluster.kill_node(node)
    cluster.add_node(cpus=2)


def test_a_node_lost_mid_synthesis_leaves_exactly_the_bytes_of_an_undisturbed_run(cluster, tmp_path):
    n, rows_per_file = 2000, 100
    args = ["synthesize", "--model", "pretrained", "--category", CATEGORY, "--n", str(n), "--rows-per-file",
            str(rows_per_file), "--workers", "2", *SLOW]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    proc = f2m([*args, "--out", "lost"], tmp_path, env)
    folder = tmp_path / "lost" / CATEGORY
    wait_for(lambda: folder.is_dir() and len(list(folder.glob("part-*.parquet"))) >= 4, "4 finished files", proc)
    kill_the_node_running(cluster, "ShardSynthesizer")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"wrote {n} masses in 20 files" in stdout and "joined the Ray cluster" in stderr, stdout + stderr
    manifest = json.loads((tmp_path / "lost" / "_manifest.json").read_text())
    assert manifest["counts"] == {CATEGORY: n}
    ids = [i for f in sorted(folder.glob("*.parquet")) for i in pq.read_table(f, columns=["sample_id"])["sample_id"].to_pylist()]
    assert len(ids) == len(set(ids)) == n
    # The undisturbed run: the same actor code in this process (its bytes equal any actor count's).
    synthesize(SynthesisConfig(categories=(CATEGORY,), n=n, out=str(tmp_path / "calm"), model="pretrained",
                               rows_per_file=rows_per_file, min_seed_distance=5.0, max_attempts=4,
                               executor="in-process"), report=None)
    assert tree(tmp_path / "lost") == tree(tmp_path / "calm")


def test_a_node_lost_mid_encoding_leaves_the_same_bank(cluster, tmp_path, ray_local):
    from f2m_ray.synth.encode import build_feature_bank

    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    proc = f2m(["encode", "--model", "pretrained", "--data", "phantom:3000", "--out", "lost.parquet"], tmp_path, env)
    wait_for(lambda: any(cluster.processes(n, "_Encoder") for n in cluster.nodes), "an encoder actor", proc)
    time.sleep(1.0)  # let it take its first batches
    kill_the_node_running(cluster, "_Encoder")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    calm = build_feature_bank("pretrained", "phantom:3000", out=str(tmp_path / "calm.parquet"))  # this session's Ray
    lost, reference = load_feature_bank(str(tmp_path / "lost.parquet")), load_feature_bank(calm)
    assert len(lost.roi_id) == 3000 and list(lost.roi_id) == list(reference.roi_id)
    assert np.array_equal(lost.features, reference.features) and lost.bank_id == reference.bank_id


# ---------------------------------------------------------------- a training worker lost


def _train_and_kill_a_worker(tmp_path, name: str, *flags: str) -> tuple[subprocess.Popen, str, str]:
    """`f2m-ray train` (tiny, checkpoint every epoch) in its own process; SIGKILL one of its two Ray Train
    workers once epoch 2 is logged. Returns the ended process, its stdout and its stderr."""
    proc = f2m(["train", "--preset", "tiny", "--data", "phantom:200", "--checkpoint-every", "1", "--storage", "runs",
                "--name", name, "--no-bank", *flags], tmp_path)
    run_dir = str(tmp_path / "runs" / name)
    try:
        wait_for(lambda: any(r["epoch"] >= 2 for r in read_metrics(run_dir)), "epoch 2", proc, seconds=240)
        workers = [p for p in _children(proc.pid) if "RayTrainWorker" in command_line(p)]
        assert len(workers) == 2, [command_line(p) for p in _children(proc.pid)]
        os.kill(workers[1], 9)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, stdout, stderr


def test_a_killed_worker_restarts_from_its_checkpoint_and_says_so(tmp_path):
    proc, output, stderr = _train_and_kill_a_worker(tmp_path, "lost", "--epochs", "6")
    run_dir = str(tmp_path / "runs" / "lost")
    assert proc.returncode == 0, output + stderr
    restart = re.findall(r"^worker lost at epoch (\d+): restarting from checkpoint epoch (\d+), 1 of 2 restarts used$",
                         output, flags=re.M)
    assert len(restart) == 1, output
    lost_at, resumed_from = map(int, restart[0])
    assert 1 <= resumed_from < lost_at <= 6  # epoch 2 may be logged before its checkpoint lands
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]  # each once, the re-run ones replaced
    events = [r for r in read_metrics(run_dir, events=True) if "event" in r]
    assert [e["event"] for e in events] == ["start", "restart"]
    assert (events[1]["lost_at_epoch"], events[1]["from_epoch"], events[1]["restarts_used"]) == (lost_at, resumed_from, 1)
    assert "epoch    6/6" in output and "core_worker.cc" not in output + stderr, output + stderr


def test_a_run_that_loses_more_workers_than_allowed_stops_in_one_line_naming_its_checkpoint(tmp_path):
    proc, _, stderr = _train_and_kill_a_worker(tmp_path, "fragile", "--epochs", "8", "--max-failures", "0")
    run_dir = str(tmp_path / "runs" / "fragile")
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert len(errors) == 1 and "training failed after 0 of 0 restarts" in errors[0], stderr
    assert f"the last checkpoint is {run_dir}/checkpoint_epoch_00000" in errors[0]
    assert errors[0].endswith("the same command resumes from it")


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
def test_s3_gone_mid_synthesis_is_one_line_and_resume_finishes_the_same_bytes(outage, s3_bucket, tmp_path):
    bucket = s3_bucket[len("s3://"):]
    args = ["synthesize", "--model", "pretrained", "--category", CATEGORY, "--n", "2000", "--rows-per-file", "100",
            "--out", f"{s3_bucket}/syn", *SLOW]
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
    synthesize(SynthesisConfig(categories=(CATEGORY,), n=2000, out=str(tmp_path / "calm"), model="pretrained",
                               rows_per_file=100, min_seed_distance=5.0, max_attempts=4, executor="in-process"),
               report=None)
    on_s3 = {k: v for k, v in objects(bucket, "syn").items() if k.endswith(".parquet")}
    assert on_s3 == tree(tmp_path / "calm") and len(on_s3) == 20


@pytest.mark.s3
def test_s3_gone_mid_training_is_one_line_and_the_same_command_resumes(outage, s3_bucket, tmp_path):
    args = ["train", "--preset", "tiny", "--data", "phantom:200", "--epochs", "4", "--checkpoint-every", "1",
            "--storage", f"{s3_bucket}/runs", "--name", "gone", "--max-failures", "0"]
    env, sentinel = secret_env(outage)
    proc = f2m(args, tmp_path, env)

    def epochs() -> list[int]:  # read from the server directly, as the run left them
        try:
            return [r["epoch"] for r in read_metrics(f"{s3_bucket}/runs/gone")]
        except (OSError, ValueError):
            return []

    wait_for(lambda: 2 in epochs(), "epoch 2 on S3", proc, seconds=240)
    outage.cut()
    start = time.time()
    stdout, stderr = proc.communicate(timeout=180)
    console = stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and time.time() - start < 120 and "Traceback" not in stderr, stderr
    assert len(errors) == 1 and "training failed" in errors[0], stderr
    outage.restore()
    again = f2m(args, tmp_path, env)
    stdout, stderr = again.communicate(timeout=300)
    console += stdout + stderr
    assert again.returncode == 0 and "resuming run" in stdout, stdout + stderr
    assert epochs() == [1, 2, 3, 4]
    # What the run left on S3 is a whole run: checkpoints with optimizer state, metrics, the loss curve.
    run_dir = f"{s3_bucket}/runs/gone"
    names = {key.split("/", 1)[0] for key in objects(s3_bucket[len("s3://"):], "runs/gone")}
    assert {"checkpoint_epoch_000004", "metrics.jsonl", "loss_curve.png", "samples"} <= names
    assert find_checkpoint(run_dir) == f"{run_dir}/checkpoint_epoch_000004"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [rows[0]["step"] * e for e in (1, 2, 3, 4)] and rows[0]["step"] > 0
    assert load_checkpoint(run_dir, with_optimizer=True).optim_state is not None
    # A model on S3, synthesized from into a local folder: the key stays out of that too.
    local = f2m(["synthesize", "--model", run_dir, "--category", CATEGORY, "--n", "20", "--out", "local"], tmp_path, env)
    stdout, stderr = local.communicate(timeout=120)
    assert local.returncode == 0 and (tmp_path / "local" / "_manifest.json").is_file(), stderr
    assert_written_nowhere(sentinel, console + stdout + stderr, s3_bucket[len("s3://"):], "runs", tmp_path)
