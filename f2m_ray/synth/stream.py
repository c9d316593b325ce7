"""Synthesis streamed into a training job: a Ray Dataset that decodes masses on the fly.

The same resolution, plan, mixing, guards and actor code as ``f2m-ray synthesize``, minus
the files: each block is one range of samples of one category, decoded by a pool of
``ShardSynthesizer`` actors and handed on as the rows a Parquet file would hold (the same
bytes for the same model, bank, seed and sample index). A Ray Train job reads it with
``get_dataset_shard`` like any other dataset, without anything written to disk.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from f2m_ray.runtime.actors import plan_actors
from f2m_ray.runtime.console import quiet_ray_data
from f2m_ray.runtime.env import worker_runtime_env
from f2m_ray.schema import decoded_images
from f2m_ray.synth.actor import ShardSynthesizer, actor_spec
from f2m_ray.synth.plan import SynthesisConfig, resolve
from f2m_ray.runtime.cluster import ensure_ray

STREAM_BLOCK_ROWS = 512  # samples per block: a first batch soon, and few blocks per epoch


class _StreamSynthesizer(ShardSynthesizer):
    """The synthesis actor, returning each range's rows instead of writing them."""

    def __call__(self, batch: dict[str, np.ndarray]):
        for category, start, stop in zip(batch["category"], batch["start"], batch["stop"]):
            yield self.shard_table(str(category), int(start), int(stop))


def stream_dataset(config: SynthesisConfig, decode_images: bool = False, columns: list[str] | None = None):
    """The samples `config` names as a lazy ``ray.data.Dataset`` (nothing is decoded until it is read)."""
    import ray

    run = resolve(replace(config, out="", rows_per_file=min(config.rows_per_file, STREAM_BLOCK_ROWS)))
    ensure_ray()
    quiet_ray_data()
    actors = plan_actors(len(run.shards), run.config.workers)
    ranges = ray.data.from_items(
        [{"category": s.category, "start": s.start, "stop": s.stop} for s in run.shards],
        override_num_blocks=len(run.shards),
    )
    rows = ranges.map_batches(
        _StreamSynthesizer,
        fn_constructor_kwargs={"spec": actor_spec(run, actors)},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors.actors),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
        runtime_env=worker_runtime_env(),
    )
    if decode_images:
        columns = ["image", "margin_id", "shape_id"] if columns is None else list(dict.fromkeys(["image", *columns]))
        rows = rows.select_columns(columns).map_batches(decoded_images, batch_format="pyarrow", batch_size=None)
    elif columns is not None:
        rows = rows.select_columns(columns)
    return rows


def stream_options(categories: tuple[str, ...], n: int, model: str | None, options: dict[str, Any]) -> SynthesisConfig:
    """A SynthesisConfig from stream()'s arguments; unknown options are a TypeError naming them."""
    known = set(SynthesisConfig.__dataclass_fields__) - {"categories", "n", "model", "out", "resume", "overwrite", "executor"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"stream() got unknown options {', '.join(unknown)}; it takes {', '.join(sorted(known))}")
    return SynthesisConfig(categories=categories, n=n, model=model, **options)
