"""`f2m-ray train`: data-parallel Feature2Mass training on Ray Train (the only module that imports ray.train).

    driver                                   each worker (TorchTrainer, one per GPU or CPU slot)
    ------                                   ----------------------------------------------
    check options, storage, resume preset    rebuild Preset from a dict, seed, build G, D1, D2
    start/join Ray, check cluster resources  resume from ray.train.get_checkpoint() if any
    read + materialize data, split by        DDP (broadcast_buffers=False), Adam x 2
      the `split` column, check categories   for each epoch: shard of "train" -> augment -> steps
    TorchTrainer.fit()  <- per-epoch lines    average BN buffers, all-reduce losses
    feature bank beside the final checkpoint rank 0: D label accuracy on real "val", metrics.jsonl,
                                               loss curve, sample grid, checkpoint; all ranks report

Resume is Ray Train V2's: running again with the same run name and storage picks up the
latest reported checkpoint, and the epoch counter continues from the one stored in it.

Why the settings are what they are:
- ``broadcast_buffers=False``: D runs two forwards (real, then fake) before one backward;
  DDP's default buffer broadcast rewrites BatchNorm's running stats in place between them
  and autograd refuses the backward. BatchNorm buffers are instead averaged over ranks
  once per epoch, so every rank (and the checkpoint) holds the same eval-mode statistics.
- D's forward in the generator phase runs under ``no_sync``: those D gradients are thrown
  away (zeroed before D's next step), so all-reducing them would be wasted bandwidth.
- Evaluation (rank 0) runs under ``no_grad`` on the unwrapped G in eval mode and on copies
  of D1/D2: nothing it does can change parameters, buffers or the DDP reducer's state, so
  ranks cannot drift through it.
- The training split is materialized before ``fit()``: phantoms are not re-rendered every
  epoch, and no Ray Data task has to run (and wait for a CPU slot) while the training
  workers hold theirs.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable


from f2m_ray.checkpoint import find_checkpoint
from f2m_ray.config import Preset
from f2m_ray.data.phantom import MASS_PROBE_SEED, mass_probe
from f2m_ray.errors import F2MError, first_line
from f2m_ray.runtime.env import worker_env
from f2m_ray.runtime.errors import ray_error_line, unwrap_training_error
from f2m_ray.runtime.trainer import check_resources, cpu_per_worker, storage_args
from f2m_ray.storage import join, probe_storage
from f2m_ray.train.report import LOSS_CURVE_FILE, format_epoch_line, format_restart_line, read_metrics
from f2m_ray.train.data import prepare_data
from f2m_ray.train.options import RunOptions, check_train_config, fresh_listing, check_storage, existing_checkpoint
from f2m_ray.train.worker import train_worker, preset_mismatch_message, same_model
from f2m_ray.runtime.cluster import ensure_ray
from f2m_ray.encode import build_feature_bank


@dataclass
class TrainSummary:
    run_dir: str
    name: str
    start_epoch: int
    end_epoch: int
    final_checkpoint: str | None
    metrics: dict[str, Any] | None
    feature_bank: str | None
    startup_seconds: float | None = None  # fit() called -> first epoch started (Ray's fixed cost)


class _MetricsTail:
    """Prints each new epoch line of the run's metrics.jsonl on the driver while fit() runs.

    The driver prints rather than rank 0 so that the lines are plain (no Ray actor prefix)
    and also appear under `ray job submit`, wherever the workers run.
    """

    def __init__(self, run_dir: str, total_epochs: int, after_epoch: int, echo: Callable[[str], None],
                 session: str = ""):
        self.run_dir, self.total_epochs, self.last_epoch, self.echo = run_dir, total_epochs, after_epoch, echo
        self.session, self.restarts_seen = session, 0
        self.first_epoch_start: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_MetricsTail":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)  # a poll may be retrying an unreachable store: the lines are best effort
        if not self._thread.is_alive():
            self.poll()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.poll()

    def poll(self) -> None:
        try:
            rows = read_metrics(self.run_dir, events=True)
        except Exception:  # a half-written file or a transient S3 error: try again next second
            return
        restarts = [r for r in rows if r.get("event") == "restart" and r.get("session") == self.session]
        for event in restarts[self.restarts_seen:]:
            self.echo(format_restart_line(event))
            self.last_epoch = min(self.last_epoch, int(event["from_epoch"]))  # the epochs after it run again
        self.restarts_seen = len(restarts)
        if restarts:  # epochs logged by the attempt that died, before its restart row, are not news
            rows = rows[max(i for i, r in enumerate(rows) if r is restarts[-1]):]
        for row in rows:
            if "epoch" not in row:
                continue
            epoch = row["epoch"]
            if epoch > self.last_epoch:
                if self.first_epoch_start is None:
                    self.first_epoch_start = row.get("epoch_start_time")
                self.last_epoch = epoch
                self.echo(format_epoch_line(row, self.total_epochs))


def train(
    preset: Preset,
    options: RunOptions,
    echo: Callable[[str], None] = print,
    start_ray: Callable[[], Any] | None = None,
) -> TrainSummary:
    """Train (or resume) the run options.run_dir on Ray Train; returns where everything landed.

    Checks that need no cluster (options, storage, the stored preset of a resumed run) come
    first; `start_ray` (default ``ensure_ray``) is called only after they pass.
    """
    cfg, run_dir = preset.train, options.run_dir
    previous = _check_before_ray(preset, options)
    start_epoch = int(previous["epoch"]) if previous else 0
    if previous is not None and start_epoch >= cfg.epochs:
        echo(f"run {run_dir} is already at epoch {start_epoch} (asked for --epochs {cfg.epochs}); nothing to train")
        bank = _maybe_feature_bank(previous["path"], preset, options, echo)
        return TrainSummary(run_dir, options.name, start_epoch, start_epoch, previous["path"], None, bank)
    echo(f"resuming run {run_dir} from epoch {start_epoch} ({previous['path']})" if previous else f"new run {run_dir}")

    (start_ray or ensure_ray)()
    import ray.train

    workers, use_gpu = _workers(options, cfg.batch_size)
    data = prepare_data(preset, options)
    echo(f"data: {data.description}: {data.train_rows} train / {data.val_rows} val rows, {len(data.categories)} categories")
    if data.dropped:
        echo("left out by the reader: " + ", ".join(f"{reason} x{n}" for reason, n in sorted(data.dropped.items())))
    per_worker = cfg.batch_size // workers
    if data.train_rows // workers < per_worker:
        raise F2MError(
            f"each of {workers} workers gets {data.train_rows // workers} train rows, fewer than its batch of "
            f"{per_worker}; lower --workers or --batch-size"
        )
    echo(
        f"training: preset {preset.name}, {workers} {'GPU' if use_gpu else 'CPU'} worker(s), global batch "
        f"{cfg.batch_size} ({per_worker} per worker), epochs {start_epoch + 1}..{cfg.epochs}"
    )
    worker_config = {
        "preset": preset.to_dict(),
        "run_dir": run_dir,
        "data": options.data,
        "train_rows": data.train_rows,
        "samples": data.samples,
        # Phantom data: held-out phantoms with their true lesions, scored with each sample grid.
        "mass_probe": _mass_probe(options.data, cfg.seed),
        "chance": data.chance,
        "shuffle_buffer": max(per_worker, min(2048, data.train_rows // workers)),
        "session": uuid.uuid4().hex,  # tells a restart of this call's workers from an earlier call's start
        "max_failures": options.max_failures,
    }
    trainer = _trainer(worker_config, data, workers, use_gpu, options, cfg.keep_checkpoints)
    fit_start = time.time()
    with _MetricsTail(run_dir, cfg.epochs, start_epoch, echo, worker_config["session"]) as tail:
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise _training_failed(err, run_dir, tail.restarts_seen, options.max_failures) from None
    startup = (tail.first_epoch_start - fit_start) if tail.first_epoch_start else None
    fresh_listing(run_dir)
    final = find_checkpoint(run_dir)
    echo(f"final checkpoint: {final}")
    echo(f"metrics: {join(run_dir, 'metrics.jsonl')}  loss curve: {join(run_dir, LOSS_CURVE_FILE)}")
    bank = _maybe_feature_bank(final, preset, options, echo)
    metrics = dict(result.metrics) if result.metrics else None
    end_epoch = int(metrics["epoch"]) if metrics else cfg.epochs
    return TrainSummary(run_dir, options.name, start_epoch, end_epoch, final, metrics, bank, startup)


def _mass_probe(data: str, seed: int) -> dict[str, Any] | None:
    """Held-out phantoms for a run on phantoms (rendered with another seed than the training set's)."""
    if not (data == "phantom" or data.startswith("phantom:")):
        return None
    return mass_probe(seed=MASS_PROBE_SEED if seed != MASS_PROBE_SEED else MASS_PROBE_SEED + 1)


def _check_before_ray(preset: Preset, options: RunOptions) -> dict[str, Any] | None:
    """Options, storage and a resumed run's stored preset; the run's latest checkpoint's metadata, if any."""
    check_train_config(preset.train, options)
    if not options.name:
        raise F2MError("a run needs a name (RunOptions.name)")
    check_storage(options)
    previous = existing_checkpoint(options.run_dir)
    if previous is not None:
        stored = Preset.from_dict(previous["preset"])
        if not same_model(stored, preset):
            raise F2MError(preset_mismatch_message(options.run_dir, stored, preset))
    return previous


def _workers(options: RunOptions, batch_size: int) -> tuple[int, bool]:
    """(training workers, on GPUs?) from the options and the cluster; refused in one line if it cannot hold them."""
    import ray

    resources = dict(ray.cluster_resources())
    use_gpu = options.use_gpu if options.use_gpu is not None else resources.get("GPU", 0) >= 1
    if options.use_gpu and resources.get("GPU", 0) < 1:
        raise F2MError("--gpu asked for, but the Ray cluster has no GPUs (run with --no-gpu)")
    workers = options.workers or (int(resources.get("GPU", 0)) if use_gpu else 2)
    if batch_size % workers:
        raise F2MError(
            f"global batch {batch_size} does not split evenly over {workers} workers; "
            f"use a --batch-size that is a multiple of {workers}"
        )
    check_resources(workers, use_gpu, resources)
    return workers, use_gpu


def _trainer(worker_config: dict[str, Any], data, workers: int, use_gpu: bool, options: RunOptions, keep: int):
    import ray.train
    from ray.train.torch import TorchTrainer

    resources_per_worker = {"CPU": cpu_per_worker(use_gpu), **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        train_worker,
        train_loop_config=worker_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=options.name,
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
            worker_runtime_env={"env_vars": worker_env()},
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            **storage_args(options.storage),
        ),
        datasets={"train": data.train, "val": data.val},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def _training_failed(err: Exception, run_dir: str, restarts: int, max_failures: int) -> F2MError:
    """The one line for a run that failed: a worker's own F2MError, or what killed it and where to resume."""
    inner = unwrap_training_error(err)
    if isinstance(inner, F2MError):
        return F2MError(str(inner))
    try:
        probe_storage(run_dir, "the run folder")  # one quick request: a store that is gone costs no retries
        fresh_listing(run_dir)
        last = existing_checkpoint(run_dir)
        where = (f"the last checkpoint is {last['path']} (epoch {last['epoch']}): the same command resumes from it"
                 if last else "no checkpoint was written")
    except Exception as listing:  # the storage itself may be what failed (botocore errors are not OSErrors)
        where = (f"its checkpoints cannot be listed now ({first_line(listing)}); once the storage answers, "
                 f"the same command resumes from the last one")
    return F2MError(f"training failed after {restarts} of {max_failures} restarts: "
                    f"{type(inner).__name__}: {ray_error_line(inner)}; {where}")


def _maybe_feature_bank(checkpoint: str, preset: Preset, options: RunOptions, echo) -> str | None:
    """Encode the labeled ROIs with the final checkpoint so that `synthesize --model RUN` needs nothing else."""
    if not options.feature_bank:
        return None

    out = build_feature_bank(checkpoint, options.data, fmt=options.data_format, seed=preset.train.seed)
    echo(f"feature bank: {out}")
    return out


def run_summary_json(summary: TrainSummary) -> str:
    return json.dumps(asdict(summary), default=str, indent=2)
