"""Category synthesis (paper 3.4, Fig. 5) as a sharded Ray Data job into Parquet.

    shards (category, [start, stop))  --Ray Data, actor pool-->  OUT/data/CATEGORY/part-START-END.parquet
      per sample i:  plan (K seeds of C, weights on the step grid)  ->  mix (scheme)  ->  decode  ->  PNG

One Ray Data operator does all the work: each actor loads the generator and the bank
once, and for each shard it plans, mixes, decodes, encodes PNGs and writes the shard's
Parquet file itself. Images never travel through Ray's object store; only a small
record per file (and a progress record every few hundred rows) comes back to the
driver. Fusing the stages in one actor is what lets the pipeline keep up with a
plain single-process loop on a 2-core machine (benchmarks/synthesis_throughput.py).

Determinism: sample i's plan is ``mixing.plan_sample(run_seed, category.id, i, ...)``
over the category's bank rows sorted by roi_id; decoding runs in eval mode in
fixed-size batches aligned on absolute sample indices (the last one padded), so
seed ids, weights and image bytes depend only on (model, bank, category, mixing scheme,
run seed, i) and the decode batch size, never on the number of actors, blocks, retries or resumes.

Output safety: files are named by the sample range they hold and appear complete or
not at all (f2m_ray.schema.write_table), so a retried or resumed shard replaces or
skips its file instead of adding a duplicate. ``_run.json`` (the run's arguments) is
written first and ``_manifest.json`` last: a dataset without a manifest is unfinished.
"""


from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from f2m_ray.errors import F2MError
from f2m_ray.runtime.actors import ActorPlan, ResourceWatch, check_workers, local_cores, plan_actors
from f2m_ray.runtime.console import quiet_ray_data
from f2m_ray.runtime.env import worker_runtime_env
from f2m_ray.runtime.errors import worker_error
from f2m_ray.synth.actor import GUARD_KEYS, ShardSynthesizer, actor_spec
from f2m_ray.synth.output import verify_finished, guard_summary, prepare_output, write_manifest
from f2m_ray.synth.plan import ResolvedRun, Shard, SynthesisConfig, SynthesisSummary, resolve
from f2m_ray.runtime.cluster import ensure_ray


REPORT_SECONDS = 5.0  # the driver prints at most one progress line this often
# ---------------------------------------------------------------- the driver


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Progress:
    """Collects the actors' records: finished files, rows done, throttled progress lines."""

    def __init__(self, run: ResolvedRun, files: dict[str, dict[str, Any]], report, on_file):
        self.run, self.files, self.report, self.on_file = run, files, report, on_file
        self.total = sum(s.rows for s in run.shards)
        self.done_before = sum(r["rows"] for r in files.values())
        self.new_rows = 0
        self.start = time.perf_counter()
        self.last_report = self.start

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for i in range(len(batch["rows"])):
            self.new_rows += int(batch["rows"][i])
            path = str(batch["path"][i])
            if path:
                start, stop = int(batch["start"][i]), int(batch["stop"][i])
                record = {"path": path, "category": str(batch["category"][i]), "start": start, "stop": stop,
                          "rows": stop - start, "bytes": int(batch["bytes"][i]),
                          "guard": {k: int(batch[k][i]) for k in GUARD_KEYS}}
                self.files[path] = record
                if self.on_file:
                    self.on_file(record)
        now = time.perf_counter()
        if now - self.last_report >= REPORT_SECONDS:
            self.last_report = now
            self.report(self.line(now - self.start))

    def line(self, seconds: float) -> str:
        rows = min(self.total, self.done_before + self.new_rows)
        rate = self.new_rows / seconds if seconds > 0 else 0.0
        eta = (self.total - rows) / rate if rate > 0 else math.inf
        return (
            f"{rows}/{self.total} masses ({100 * rows / self.total:.0f}%), {len(self.files)}/{len(self.run.shards)} "
            f"files, {rate:.0f} masses/s, eta {_duration(eta) if math.isfinite(eta) else '?'}"
        )


RAY_DATA_SETTINGS = {
    "enable_progress_bars": False,  # our own progress lines instead (one per REPORT_SECONDS)
    "print_on_execution_start": False,
    # Every record an actor yields becomes its own (tiny) block, so that progress within a
    # shard reaches the driver while the shard runs instead of when it ends.
    "target_max_block_size": 1,
}


def _run_on_ray(run: ResolvedRun, todo: list[Shard], progress: _Progress) -> None:
    """The shards through one Ray Data operator: an actor pool of ShardSynthesizers."""
    import ray

    ensure_ray()
    quiet_ray_data()
    actors = plan_actors(len(todo), run.config.workers)
    progress.report(
        f"synthesizing {sum(s.rows for s in todo)} masses in {len(todo)} files with {actors.actors} actor(s) x "
        f"{actors.torch_threads} torch thread(s) on {actors.device}"
        + (f"; {len(progress.files)} files already done" if progress.files else "")
    )
    # A dataset copies the current DataContext when it is made: change it for ours only.
    context = ray.data.DataContext.get_current()
    saved = {name: getattr(context, name) for name in RAY_DATA_SETTINGS}
    for name, value in RAY_DATA_SETTINGS.items():
        setattr(context, name, value)
    try:
        shards = ray.data.from_items(
            [{"category": s.category, "start": s.start, "stop": s.stop, "path": s.path} for s in todo],
            override_num_blocks=len(todo),  # one shard per block: any actor can take any shard
        )
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
    results = shards.map_batches(
        ShardSynthesizer,
        fn_constructor_kwargs={"spec": actor_spec(run, actors)},
        batch_size=1,
        # One shard in flight per actor: a queued shard would wait behind a busy actor while another idles.
        compute=ray.data.ActorPoolStrategy(size=actors.actors, max_tasks_in_flight_per_actor=1),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
        runtime_env=worker_runtime_env(),
    )
    try:
        with ResourceWatch("synthesis", gpus=actors.num_gpus) as watch:
            for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                watch.heard()
                progress.add(batch)
    except (F2MError, KeyboardInterrupt):  # the driver's own: a resource wait given up, an interrupt
        raise
    except Exception as err:  # Ray wraps what failed in an actor
        raise _failed(err, progress) from None


def _failed(err: BaseException, progress: _Progress) -> F2MError:
    """The one line for a shard that failed, the same from a Ray actor as from this process."""
    return F2MError(f"synthesis failed: {worker_error(err)}; {len(progress.files)} finished files are kept, "
                    f"run again with --resume once fixed")


def _in_process_synthesizer(run: ResolvedRun) -> ShardSynthesizer:
    """The actor, built in this process with every core's torch threads (and the GPU if there is one)."""
    import torch

    actors = ActorPlan(actors=1, torch_threads=local_cores(), num_cpus=0, num_gpus=1 if torch.cuda.is_available() else 0)
    return ShardSynthesizer(actor_spec(run, actors))


def _run_in_process(run: ResolvedRun, todo: list[Shard], progress: _Progress,
                    synthesizer: ShardSynthesizer | None = None, why: str = "") -> None:
    """The same work in this process, shard after shard (small runs, tests, benchmarks)."""
    synthesizer = synthesizer or _in_process_synthesizer(run)
    progress.report(
        f"synthesizing {sum(s.rows for s in todo)} masses in {len(todo)} files in this process on "
        f"{synthesizer.device}" + (f" ({why})" if why else "")
    )
    for shard in todo:
        for record in synthesizer.synthesize_shard(shard.category, shard.start, shard.stop, shard.path):
            progress.add(record)


IN_PROCESS_MAX_SECONDS = 30.0  # "auto" runs work this short in this process (see choose_executor)
# A mass costs at least this much CPU time in one process whatever decodes it (plan, nearest-seed
# distance, PNG, Parquet: 0.45 ms on one core here, GPU or not): more masses than the threshold
# allows at this rate go to Ray without a trial batch.
MIN_SECONDS_PER_MASS = 0.3e-3


def choose_executor(run: ResolvedRun, todo: list[Shard]) -> tuple[bool, ShardSynthesizer | None, str]:
    """For ``--executor auto``: (use Ray?, the in-process synthesizer if it was built, why).

    Starting Ray and its actor processes costs about 10 s on a 2-core laptop (4 s for Ray, 6 s
    for two actors to boot Python, Ray's worker and torch), after which two single-threaded
    actors run 1.2-1.4x faster than one process with two threads
    (benchmarks/synthesis_throughput.py). So work of up to about 30 s runs sooner here. The
    estimate times one decode batch of the run's first shard on this machine, after a warm-up
    batch, with the actor code itself (no trial for runs too large to qualify at any decode speed).
    A cluster named by RAY_ADDRESS, or --workers, means Ray.
    """
    if os.environ.get("RAY_ADDRESS"):
        return True, None, "the Ray cluster in RAY_ADDRESS"
    if run.config.workers is not None:
        return True, None, "--workers sizes a Ray actor pool"
    rows = sum(s.rows for s in todo)
    if rows * MIN_SECONDS_PER_MASS > IN_PROCESS_MAX_SECONDS:
        return True, None, f"{rows} masses: Ray's actors share them"
    synthesizer = _in_process_synthesizer(run)
    seconds = synthesizer.estimate_seconds(todo[0], rows)
    if seconds <= IN_PROCESS_MAX_SECONDS:
        return False, synthesizer, f"about {max(1.0, seconds):.0f} s of work: less than starting Ray would take"
    return True, None, f"about {seconds:.0f} s of work in one process: Ray's actors share it"


def synthesize(
    config: SynthesisConfig,
    report: Callable[[str], None] | None = _stderr,
    on_file: Callable[[dict[str, Any]], None] | None = None,
    use_ray: bool | None = None,
) -> SynthesisSummary:
    """Run the synthesis; `report` gets human progress lines, `on_file` each finished file.

    Where the shards run follows ``config.executor`` (``choose_executor`` for "auto");
    ``use_ray`` True or False overrides it. The bytes are the same either way.
    """
    report = report or (lambda line: None)
    run = resolve(config)
    if use_ray is None and run.config.executor != "auto":
        use_ray = run.config.executor == "ray"
    if use_ray is not False and config.workers is not None:  # before --overwrite touches anything

        ensure_ray()
        check_workers(config.workers)
    finished = prepare_output(run)
    report(f"model: {run.checkpoint} (id {run.model_id}; {run.model_source})")
    for note in run.notes:
        report(f"note: {note}")
    files = {
        s.path: {"path": s.path, "category": s.category, "start": s.start, "stop": s.stop, "rows": s.rows,
                 "bytes": finished[s.path]}
        for s in run.shards
        if s.path in finished
    }
    if files:
        verify_finished(run, list(files.values()))  # and reads their guard counts
    todo = [s for s in run.shards if s.path not in finished]
    progress = _Progress(run, files, report, on_file)
    if todo:
        try:  # the actor's own work in this process: what fails reads as it would from a Ray actor
            synthesizer, why = None, ""
            if use_ray is None:
                use_ray, synthesizer, why = choose_executor(run, todo)
            if not use_ray:
                _run_in_process(run, todo, progress, synthesizer, why)
        except KeyboardInterrupt:
            raise
        except Exception as err:
            raise _failed(err, progress) from None
        if use_ray:
            _run_on_ray(run, todo, progress)
    seconds = time.perf_counter() - progress.start
    missing = [s.path for s in run.shards if s.path not in files]
    if missing:
        raise F2MError(f"{len(missing)} files were not written (e.g. {missing[0]}); run again with --resume")
    manifest = write_manifest(run, [files[s.path] for s in run.shards], seconds)
    guards = guard_summary([files[s.path]["guard"] for s in run.shards]) if run.guarded else None
    return SynthesisSummary(
        out=config.out,
        rows=progress.total,
        files=len(run.shards),
        written_rows=sum(s.rows for s in todo),
        written_files=len(todo),
        seconds=seconds,
        manifest=manifest,
        notes=run.notes,
        guards=guards,
    )
