"""`f2m-ray judge train` on Ray Train: DDP over workers, rank 0 writes the judge, epoch lines
reach the driver through a Ray queue (f2m_ray.evaluation.judge has the model, training and format).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from f2m_ray.config import build_dataclass
from f2m_ray.errors import F2MError, first_line
from f2m_ray.storage import is_remote
from f2m_ray.runtime.env import worker_env
from f2m_ray.runtime.errors import unwrap_training_error
from f2m_ray.runtime.trainer import check_resources, cpu_per_worker, threads_per_worker
from f2m_ray.evaluation.judge import LabeledArrays, fit, judge_report, new_judge
from f2m_ray.judge_model import JudgeConfig, JudgeTrainConfig, read_judge_metadata, save_judge


# ---------------------------------------------------------------- Ray Train


def _train_worker(loop_config: dict[str, Any]) -> None:
    """Per-worker loop of `train_judge_on_ray`: DDP over the workers, rank 0 writes the judge."""
    import ray
    import ray.train
    import ray.train.torch


    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        torch.set_num_threads(threads_per_worker(context.get_local_world_size()))
    config = build_dataclass(JudgeConfig, loop_config["config"])
    train_config = build_dataclass(JudgeTrainConfig, loop_config["train_config"])
    data: LabeledArrays = ray.get(loop_config["data"])
    train, val = data.where_split("train"), data.where_split("val")
    started = time.perf_counter()
    model = ray.train.torch.prepare_model(new_judge(config, train_config.seed))

    lines = loop_config.get("progress")  # a ray.util.queue.Queue the driver prints from, or None

    def on_epoch(epoch: int, loss: float) -> None:
        if rank == 0 and (epoch % 5 == 0 or epoch == train_config.epochs):
            line = f"judge epoch {epoch}/{train_config.epochs}: loss {loss:.3f}"
            if lines is not None:
                lines.put(line)
            else:
                print(line, flush=True)

    result = fit(model, train.images, train.margin, train.shape, train_config, rank, world_size, device, on_epoch=on_epoch)
    judge = getattr(model, "module", model).cpu()
    if rank == 0:
        report = judge_report(judge, train, val, result, time.perf_counter() - started)
        save_judge(loop_config["out"], judge, train_config, report, loop_config.get("data_description", ""),
                   train_ids=train.roi_id.tolist())
    ray.train.report({"loss": result["loss"]})


def train_judge_on_ray(
    data: LabeledArrays,
    out: str,
    config: JudgeConfig = JudgeConfig(),
    train_config: JudgeTrainConfig = JudgeTrainConfig(),
    num_workers: int = 1,
    use_gpu: bool = False,
    data_description: str = "",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a judge with Ray Train (TorchTrainer, DDP over `num_workers`); rank 0 writes it to `out`.

    Same conventions as `f2m_ray.train.driver`: resources per worker, torch threads per worker, S3
    settings forwarded to the workers, a worker's F2MError surfaced as one line. Returns the
    judge's report (held-out accuracy), read back from what rank 0 wrote. The labeled arrays
    travel once through the object store; every worker trains on its slice of each batch.
    ``progress`` gets rank 0's epoch lines on the driver (through a Ray queue, so it works
    across nodes and with the workers' own logs kept off the console); without it they are
    printed by the worker.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer


    check_resources(num_workers, use_gpu, dict(ray.cluster_resources()))
    if not is_remote(out):
        out = os.path.abspath(out)  # rank 0 writes it, from another working directory
    if len(data.where_split("train")) < 2 * num_workers:
        raise F2MError(f"{len(data.where_split('train'))} training rows are too few for {num_workers} workers")
    loop_config = {
        "config": asdict(config),
        "train_config": asdict(train_config),
        "data": ray.put(data),
        "out": out,
        "data_description": data_description,
        "progress": None,
    }
    resources = {"CPU": cpu_per_worker(use_gpu), **({"GPU": 1} if use_gpu else {})}
    # Ray Train keeps its run state under storage_path; nothing of it is needed afterwards.
    with tempfile.TemporaryDirectory(prefix="f2m-judge-") as run_root:
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name="judge",
                storage_path=run_root,
                worker_runtime_env={"env_vars": worker_env()},
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        )
        try:
            with _ProgressPump(progress) as queue:
                loop_config["progress"] = queue
                trainer.fit()
        except ray.train.TrainingFailedError as err:
            inner = unwrap_training_error(err)
            if isinstance(inner, F2MError):
                raise F2MError(str(inner)) from None
            raise F2MError(f"judge training failed: {type(inner).__name__}: {first_line(inner)}") from None
    return read_judge_metadata(out)["report"]


class _ProgressPump:
    """A Ray queue whose lines a driver thread hands to `progress` while training runs."""

    def __init__(self, progress: Callable[[str], None] | None):
        self.progress = progress
        self.queue = None
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()

    def __enter__(self):
        if self.progress is None:
            return None
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self.queue

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                line = self.queue.get(block=True, timeout=0.5)
            except Empty:
                if self.stop.is_set():
                    return
                continue
            except Exception:  # the queue's actor went away: nothing more will come
                return
            self.progress(line)

    def __exit__(self, *exc) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join(timeout=10)
            self.queue.shutdown()
