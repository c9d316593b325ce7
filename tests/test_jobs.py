"""The cluster path as users run it: `ray job submit -- python jobs/...` on a `ray start` cluster.

The cluster has no oversubscribed CPU slots (a head with none, two worker nodes with 2), so a
step that leaves resources held, or a pool of actors that takes every CPU its own input tasks
need, waits forever here where embedded Ray would not. Each job must finish SUCCEEDED with its
outputs, and print our lines, not Ray's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Reporting training result", "TrainingReport(", "core_worker.cc", "Traceback", "RayDeprecationWarning",
         "Progress bars disabled", "execution finished")

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray_cluster


def submit(cluster: LocalCluster, script: str, *args: str, env: dict[str, str] | None = None,
           timeout: float = 300) -> tuple[str, str]:
    """`ray job submit --working-dir . -- python jobs/SCRIPT ARGS` as a user types it: (final status, logs)."""
    from ray.job_submission import JobSubmissionClient

    command = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", cluster.dashboard,
               "--working-dir", ".", *(["--runtime-env-json", json.dumps({"env_vars": env})] if env else []),
               "--", "python", f"jobs/{script}", *args]
    result = subprocess.run(command, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=timeout)
    client = JobSubmissionClient(cluster.dashboard)
    job = next(j for j in client.list_jobs() if j.entrypoint.startswith(f"python jobs/{script} {' '.join(args)}"))
    return str(client.get_job_status(job.submission_id)), client.get_job_logs(job.submission_id) + result.stderr[-2000:]


def test_train_encode_and_synthesize_jobs_succeed_one_after_another(cluster, tmp_path):
    runs, bank, syn = tmp_path / "runs", tmp_path / "bank.parquet", tmp_path / "syn"
    status, logs = submit(cluster, "train.py", "--preset", "tiny", "--data", "phantom:200", "--epochs", "2",
                          "--storage", str(runs), "--name", "jt")
    assert status == "SUCCEEDED", logs
    assert "joined the Ray cluster at" in logs and "epoch    2/2" in logs
    run = runs / "jt"
    assert (run / "checkpoint_epoch_000002" / "feature_bank.parquet").is_file()  # the bank: the step that waited before
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "epoch" in json.loads(line)] == [1, 2]

    status, logs = submit(cluster, "encode.py", "--model", str(run), "--data", "phantom:300", "--out", str(bank))
    assert status == "SUCCEEDED", logs
    assert pq.read_metadata(bank).num_rows == 300

    status, logs = submit(cluster, "synthesize.py", "--model", str(run), "--bank", str(bank),
                          "--category", "spiculated-irregular", "--n", "400", "--rows-per-file", "200", "--out", str(syn))
    assert status == "SUCCEEDED", logs
    assert "actor(s)" in logs  # on the cluster's actors, not in the job's driver process
    assert json.loads((syn / "_manifest.json").read_text())["counts"] == {"spiculated-irregular": 400}
    for noise in NOISE:
        assert noise not in logs, f"{noise!r} in the job logs:\n{logs}"


def test_a_job_that_cannot_get_its_cpus_says_so_in_one_line_in_bounded_time(cluster, tmp_path):
    """Another job holds every CPU: encoding stops after F2M_RESOURCE_WAIT_S instead of waiting forever."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    blocker = client.submit_job(entrypoint=(  # an actor of 2 CPUs on each worker node
        "python -c \"import ray, time; ray.init(); "
        "hold = [ray.remote(num_cpus=2)(type('Hold', (), {'ready': lambda self: 1})).remote() for _ in range(2)]; "
        "ray.get([h.ready.remote() for h in hold]); print('holding', flush=True); time.sleep(600)\""))
    try:
        deadline = time.time() + 60
        while "holding" not in client.get_job_logs(blocker):
            assert time.time() < deadline, client.get_job_logs(blocker)
            time.sleep(0.5)
        start = time.time()
        status, logs = submit(cluster, "encode.py", "--model", "pretrained", "--data", "phantom:100",
                              "--out", str(tmp_path / "b.parquet"), env={"F2M_RESOURCE_WAIT_S": "8"})
        took = time.time() - start
    finally:
        client.stop_job(blocker)
    errors = [line for line in logs.splitlines() if line.startswith("Error:")]
    assert status == "FAILED" and took < 90, (took, logs)
    assert len(errors) == 1 and "encoding: nothing from the workers for 8 s while the Ray cluster has 0 of 4 CPUs free" \
        in errors[0], logs
    assert "Traceback" not in logs and not (tmp_path / "b.parquet").exists()
