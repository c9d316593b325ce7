"""Starting Ray and owning the console: f2m_ray.runtime.cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest

NOISE = (b"[2026-12-03 13:21:16,707 E 2648 2648] core_worker.cc:2465: Actor with class name: "
         b"'MapWorker(MapBatches(_Encoder))' and ID: '435b' has constructor arguments in the object store and "
         b"max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
         b"will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")


def test_the_stderr_filter_drops_only_the_native_noise_and_loses_nothing_else():
    child = f"""
import os, sys
from f2m_ray.runtime.console import NativeStderrFilter
f = NativeStderrFilter()
os.write(2, b"first line\\n")
os.write(2, {NOISE!r} + b"\\n")
os.write(2, b"[a native line that matters] core_worker.cc:1: real error\\n")
sys.stderr.write("from python, ")
sys.stderr.write("in two writes\\n")
os.write(2, b"a partial line")
os.write(2, b" ended later\\n")
os.write(2, b"[2026 E] last words without a newline")
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert result.returncode == 0
    assert result.stderr.decode().splitlines() == [
        "first line",
        "[a native line that matters] core_worker.cc:1: real error",
        "from python, in two writes",
        "a partial line ended later",
        "[2026 E] last words without a newline",
    ]


@pytest.mark.ray
@pytest.mark.slow
def test_embedded_ray_starts_whatever_a_dead_ray_start_cluster_left_behind():
    # `ray start` writes the cluster's address to RAY_TMPDIR/ray/ray_current_cluster; a plain
    # ray.init(num_cpus=...) then tries to join that (dead) cluster and refuses to start.
    with tempfile.TemporaryDirectory(prefix="f2mrt", dir="/tmp") as temp:
        os.makedirs(os.path.join(temp, "ray"))
        with open(os.path.join(temp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:6399\n")
        env = {**os.environ, "RAY_TMPDIR": temp}
        env.pop("RAY_ADDRESS", None)
        child = "from f2m_ray.runtime.cluster import ensure_ray; ensure_ray(); import ray; print(ray.cluster_resources()['CPU'])"
        result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[-1]) >= 4  # our own embedded Ray, with its oversubscribed CPU slots


def test_actor_plans(monkeypatch):
    import ray

    from f2m_ray.runtime import actors

    monkeypatch.setattr(actors, "local_cores", lambda: 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})  # embedded Ray: oversubscribed slots
    assert actors.plan_actors(10) == actors.ActorPlan(2, torch_threads=1, num_cpus=1.0, num_gpus=0)
    assert actors.plan_actors(1) == actors.ActorPlan(1, torch_threads=2, num_cpus=2.0, num_gpus=0)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    # A GPU is shared by single-core actors: 7 of them get 0.1428 of it each (7 x 0.1428 <= 1).
    plan = actors.plan_actors(7)
    assert (plan.actors, plan.num_gpus, plan.num_cpus, plan.device) == (7, 0.1428, 1, "cuda")
    assert actors.plan_actors(100).actors == 16 and actors.plan_actors(1, workers=1).num_gpus == 1.0


def test_actors_that_read_from_tasks_leave_a_cluster_cpu_for_them(monkeypatch):
    """On a cluster (no oversubscribed slots) an encoder pool holding every CPU would starve its own reads."""
    import ray

    from f2m_ray.runtime import actors

    monkeypatch.setattr(actors, "local_cores", lambda: 2)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # embedded Ray: its slots are oversubscribed, nothing to leave
    assert actors.plan_actors(10, workers=1, upstream_tasks=True) == actors.ActorPlan(1, 2, 2.0, 0)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 4.0}}])
    assert actors.plan_actors(10, workers=1) == actors.ActorPlan(1, 4, 4.0, 0)  # synthesis: nothing upstream
    assert actors.plan_actors(10, workers=1, upstream_tasks=True) == actors.ActorPlan(1, 4, 3.0, 0)
    assert actors.plan_actors(10, workers=4, upstream_tasks=True) == actors.ActorPlan(4, 1, 1.0, 0)  # 1 CPU at least
    assert actors.plan_actors(10, workers=2, upstream_tasks=True) == actors.ActorPlan(2, 2, 1.5, 0)
    # Two nodes of 2 CPUs (and a dead one of 8): one actor cannot use 4 threads on one node.
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}},
                                               {"Alive": True, "Resources": {"CPU": 2.0}},
                                               {"Alive": False, "Resources": {"CPU": 8.0}}])
    assert actors.plan_actors(10, workers=1) == actors.ActorPlan(1, 2, 2.0, 0)
    assert actors.plan_actors(10, workers=1, upstream_tasks=True) == actors.ActorPlan(1, 2, 2.0, 0)


def test_a_wait_for_resources_that_never_come_ends_in_one_line(monkeypatch, ray_local):
    """With Ray running in this process (its signal handlers installed), as in a command."""
    import ray

    from f2m_ray.errors import F2MError
    from f2m_ray.runtime.actors import ResourceWatch

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    start = time.monotonic()
    with pytest.raises(F2MError, match=r"^encoding: nothing from the workers for 2 s while the Ray cluster has 0 of 2 CPUs free"):
        with ResourceWatch("encoding", seconds=2):
            while time.monotonic() - start < 30:
                time.sleep(0.05)  # a loop that hears nothing
    assert time.monotonic() - start < 5
    # Results keep arriving, or the cluster has room (slow, not starved): no interruption.
    with ResourceWatch("synthesis", seconds=1) as watch:
        for _ in range(40):
            watch.heard()
            time.sleep(0.05)
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.0})
    with ResourceWatch("synthesis", seconds=0.5):
        time.sleep(2.5)


def test_errors_from_ray_workers_read_as_the_line_raised_there():
    from f2m_ray.errors import F2MError
    from f2m_ray.runtime.errors import worker_error

    class ActorDied(Exception):  # Ray's text for an actor whose constructor raised: the remote traceback
        pass

    died = ActorDied("The actor died because of an error raised in its creation task, ray::MapWorker.__init__()\n"
                     '  File "/x/actor.py", line 50, in __init__\n    raise F2MError(...)\n'
                     "f2m_ray.errors.F2MError: the feature bank b.parquet changed during the run")
    died.__cause__ = Exception("")  # Ray Data's empty SystemException
    assert worker_error(died) == "the feature bank b.parquet changed during the run"
    crashed = ActorDied("The actor died ...\n  File \"/x/y.py\", line 3, in f\nOSError: [Errno 28] No space left on device")
    assert worker_error(crashed) == "OSError: [Errno 28] No space left on device"

    class TaskError(Exception):  # RayTaskError: the original exception rebuilt in `.cause`
        def __init__(self, cause):
            super().__init__("ray::task failed\nTraceback ...")
            self.cause = cause

    assert worker_error(TaskError(OSError("When uploading part: connection refused"))) == \
        "OSError: When uploading part: connection refused"
    assert worker_error(TaskError(F2MError("the checkpoint x changed during the run"))) == \
        "the checkpoint x changed during the run"
    assert worker_error(ValueError("bad value")) == "ValueError: bad value"
