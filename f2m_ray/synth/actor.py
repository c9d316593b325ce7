"""The Ray Data actor that makes one shard file: plan, mix, decode, guard, PNG, Parquet.

It runs the same in a Ray worker and in this process (`synthesize(use_ray=False)`); it is
built from an `ActorSpec` of plain values and paths, so a restarted actor rebuilds itself.
"""


from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from f2m_ray import __version__
from f2m_ray.errors import F2MError
from f2m_ray.bank import FeatureBank, load_feature_bank
from f2m_ray.labels import Category
from f2m_ray.core.mixing import mix_rows, plan_sample
from f2m_ray.core.images import to_model_range, to_uint8
from f2m_ray.core.inference import inference_decoder
from f2m_ray.core.nearest import NearestImage
from f2m_ray.judge_model import label_confidence, load_judge
from f2m_ray.schema import SYNTHETIC_SCHEMA, decode_png, image_column, png_bytes, synthetic_metadata, write_table
from f2m_ray.storage import join
from f2m_ray.runtime.actors import ActorPlan, prepare_torch
from f2m_ray.synth.plan import ResolvedRun, Shard
from f2m_ray.checkpoint import load_generator


ROW_GROUP_ROWS = 1000  # ~4 MB of PNGs per row group: readers can stream a file
PROGRESS_ROWS = 512  # actors report progress about this often (rounded to decode batches)
# ---------------------------------------------------------------- the actor


class ShardSynthesizer:
    """Ray Data actor: loads the model and bank once; turns a shard into a Parquet file."""

    def __init__(self, spec: ActorSpec):
        self.spec = spec
        self.run = run = spec.run
        self.config = c = run.config
        prepare_torch(spec.plan.torch_threads, spec.plan.device)
        self.device = spec.plan.device
        generator, meta = load_generator(run.model, self.device)  # found on the driver: not searched for again
        if meta["model_id"] != run.model_id:
            raise F2MError(f"the checkpoint {run.checkpoint} changed during the run")
        self.decoder = inference_decoder(generator.decoder).to(self.device)  # the decoder alone, BatchNorm folded
        self.bank = load_feature_bank(run.bank_path, with_images=True)
        if self.bank.bank_id != run.bank_id:
            raise F2MError(f"the feature bank {run.bank_path} changed during the run")
        self.judge = None
        if run.judge_path:
            loaded = load_judge(run.judge_path)
            if loaded.judge_id != run.judge_id:
                raise F2MError(f"the judge {run.judge_path} changed during the run")
            self.judge = loaded.model.to(self.device).eval()
        self.categories: dict[str, Category] = {p.category.name: p.category for p in run.categories}
        self.pools: dict[str, np.ndarray] = {}  # category -> bank rows of its seeds, roi_id order
        self.centroids: dict[str, np.ndarray | None] = {}  # category -> mean seed feature (variance-preserving)
        for name, category in self.categories.items():
            pool = self.pools[name] = self.bank.pool(category, c.seed_split)
            self.centroids[name] = pool_centroid(self.bank.features, pool) if run.scheme.variance_preserving else None
        # nearest_seed_distance: to every real ROI of the seed split, of any category (a mass may
        # come closest to a patient's ROI of another category), as evaluate's memorization measures.
        self.seed_pixels = seed_images(self.bank, self.bank.seed_rows(c.seed_split))
        self.metadata_base = {
            "tool_version": __version__,
            "model_id": run.model_id,
            "bank_id": run.bank_id,
            "model_config": run.preset,
            "run": run.fingerprint(),
        }

    def __call__(self, batch: dict[str, np.ndarray]):
        for category, start, stop, path in zip(batch["category"], batch["start"], batch["stop"], batch["path"]):
            yield from self.synthesize_shard(str(category), int(start), int(stop), str(path))

    def synthesize_shard(self, category_name: str, start: int, stop: int, relative_path: str):
        """Yield progress records, then one record naming the written file."""
        columns: dict[str, list] = {k: [] for k in COLUMNS}
        reported = 0
        for begin in self._decode_range(category_name, start, stop, columns):
            if begin - start - reported >= PROGRESS_ROWS and begin < stop:
                yield _record(category_name, start, stop, begin - start - reported)
                reported = begin - start
        guard = guard_counts(columns)
        table = self._table(self.categories[category_name], start, stop, columns, guard)
        size = write_table(table, join(self.run.out_dir, relative_path), row_group_size=ROW_GROUP_ROWS)
        yield _record(category_name, start, stop, stop - start - reported, relative_path, size, guard)

    def shard_table(self, category_name: str, start: int, stop: int):
        """Samples [start, stop) of a category as the rows a shard file holds (a pyarrow Table), unwritten."""
        columns: dict[str, list] = {k: [] for k in COLUMNS}
        for _ in self._decode_range(category_name, start, stop, columns):
            pass
        return self._table(self.categories[category_name], start, stop, columns, guard_counts(columns))

    def _decode_range(self, category_name: str, start: int, stop: int, columns: dict[str, list]):
        """Decode samples [start, stop) into `columns`; yields the index reached after each decode batch."""
        category = self.categories[category_name]
        pool = self.pools[category_name]
        batch_size = self.config.batch_size
        begin = start
        while begin < stop:
            end = min(stop, (begin // batch_size + 1) * batch_size)  # decode batches aligned on absolute indices
            self._decode_batch(category, pool, begin, end, columns)
            begin = end
            yield begin

    def estimate_seconds(self, shard: Shard, rows: int) -> float:
        """Seconds this synthesizer would take for `rows` masses: one decode batch of `shard` (guards and
        their retries included) timed after a warm-up batch."""
        category = self.categories[shard.category]
        pool = self.pools[category.name]
        end = min(shard.stop, (shard.start // self.config.batch_size + 1) * self.config.batch_size)
        self._candidates(category, pool, np.arange(shard.start, end), 0)  # first-call allocations, kernel choices
        start = time.perf_counter()
        self._decode_batch(category, pool, shard.start, end, {k: [] for k in COLUMNS})
        return (time.perf_counter() - start) * rows / (end - shard.start)

    def _decode_batch(self, category: Category, pool: np.ndarray, begin: int, end: int, columns: dict[str, list]) -> None:
        """Samples [begin, end): candidate 0 for each, then further sub-seeds for those a guard rejects."""
        n = end - begin
        best = self._candidates(category, pool, np.arange(begin, end), 0)
        shortfall = self._shortfall(best)  # (n,), 0 = every guard passed
        attempt = np.zeros(n, dtype=np.int32)
        tried = np.ones(n, dtype=np.int32)
        for a in range(1, self.run.attempts):
            pending = np.flatnonzero(shortfall > 0)
            if len(pending) == 0:
                break
            candidate = self._candidates(category, pool, begin + pending, a)
            gap = self._shortfall(candidate)
            tried[pending] += 1
            better = gap < shortfall[pending]  # the first candidate wins ties: a pure function of i
            for key, values in candidate.items():
                best[key][pending[better]] = values[better]
            shortfall[pending[better]] = gap[better]
            attempt[pending[better]] = a
        columns["png"].extend(png_bytes(p) for p in best["pixels"])
        for rows, weights in zip(best["rows"], best["weights"]):  # only the seeds that carry weight
            carried = weights > 0
            columns["seed_ids"].append(self.bank.roi_id[rows[carried]].tolist())
            columns["weights"].append(weights[carried].tolist())
        columns["distance"].extend(best["distance"].tolist())
        columns["confidence"].extend(best["confidence"].tolist())
        columns["attempt"].extend(attempt.tolist())
        columns["passed"].extend((shortfall == 0).tolist())
        columns["tried"].extend(tried.tolist())

    def _candidates(self, category: Category, pool: np.ndarray, indices: np.ndarray, attempt: int) -> dict[str, np.ndarray]:
        """Plan, mix, decode and score candidate `attempt` of samples `indices` (at most one decode batch)."""
        import torch

        c = self.config
        b = len(indices)
        plans = [
            plan_sample(c.seed, category.id, int(index), len(pool), c.k, c.step, c.alpha, attempt)
            for index in indices
        ]
        rows = np.stack([pool[p.seed_positions] for p in plans])  # (b, K) bank rows
        weights = np.stack([p.weights for p in plans])  # (b, K), each row on the grid, sum 1
        # Always a full decode batch (zero-padded): a sample's bytes must not depend on its batch-mates.
        mixed = np.zeros((c.batch_size, self.bank.feature_dim), dtype=np.float32)  # (B, D)
        mixed[:b] = mix_rows(self.bank.features[rows], weights, self.centroids[category.name], len(pool))
        bf16 = c.precision == "bf16" or (c.precision == "auto" and self.device == "cuda")
        with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=bf16):
            images = self.decoder(torch.from_numpy(mixed).to(self.device))  # (B, 1, 64, 64)
        pixels = to_uint8(images.float().cpu().numpy()[:, 0])  # (B, 64, 64) uint8, as stored
        confidence = np.full(b, np.nan, dtype=np.float32)
        if self.judge is not None:  # scores the stored 8-bit image, as a reader of the PNG gets it
            n = len(pixels)  # the whole decode batch in one pass, as always: the same kernels, the same bits
            confidence = label_confidence(self.judge, to_model_range(pixels), np.full(n, category.margin_id),
                                          np.full(n, category.shape_id))[:b]
        return {
            "rows": rows,
            "weights": weights,
            "pixels": pixels[:b],
            "distance": self.seed_pixels.rms(pixels[:b]),
            "confidence": confidence,
        }

    def _shortfall(self, candidate: dict[str, np.ndarray]) -> np.ndarray:
        """How far each candidate falls short of the guards, each in its own relative units; 0 = accepted."""
        c = self.config
        gap = np.zeros(len(candidate["rows"]), dtype=np.float64)
        if c.min_label_confidence is not None:
            p = float(c.min_label_confidence)
            gap += np.maximum(0.0, p - candidate["confidence"].astype(np.float64)) / p
        if c.min_seed_distance is not None:
            d = float(c.min_seed_distance)
            gap += np.maximum(0.0, d - candidate["distance"].astype(np.float64)) / d
        return gap

    def _table(self, category: Category, start: int, stop: int, columns: dict[str, list], guard: dict[str, int]):
        import pyarrow as pa

        n = stop - start
        ids = [f"{category.name}-{i:09d}" for i in range(start, stop)]
        distance = np.asarray(columns["distance"], dtype=np.float32)
        confidence = np.asarray(columns["confidence"], dtype=np.float32)
        metadata = synthetic_metadata(
            {**self.metadata_base, "category": category.name, "sample_range": [start, stop], "guard": guard}
        )
        schema = SYNTHETIC_SCHEMA.with_metadata(metadata)
        return pa.Table.from_arrays(
            [
                pa.array(ids, pa.string()),
                pa.array(np.arange(start, stop, dtype=np.int64)),
                image_column(columns["png"], [f"{i}.png" for i in ids]),
                pa.array(np.full(n, 64, dtype=np.int32)),
                pa.array(np.full(n, 64, dtype=np.int32)),
                pa.array([category.margin] * n, pa.string()),
                pa.array([category.shape] * n, pa.string()),
                pa.array([category.name] * n, pa.string()),
                pa.array(np.full(n, category.margin_id, dtype=np.int64)),
                pa.array(np.full(n, category.shape_id, dtype=np.int64)),
                pa.array(columns["seed_ids"], pa.list_(pa.string())),
                pa.array(columns["weights"], pa.list_(pa.float64())),
                pa.array([self.run.model_id] * n, pa.string()),
                pa.array([self.run.bank_id] * n, pa.string()),
                pa.array(np.full(n, self.config.seed, dtype=np.int64)),
                pa.array(confidence, pa.float32(), mask=np.isnan(confidence)),
                pa.array(distance, pa.float32()),
                pa.array(np.asarray(columns["attempt"], dtype=np.int32)),
                pa.array(np.asarray(columns["passed"], dtype=bool)),
            ],
            schema=schema,
        )


def pool_centroid(features: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """The category centroid of the variance-preserving mix: mean seed feature, (D,) float64.

    A fixed-order float64 sum over the pool (roi_id order), the same in every actor.
    """
    return np.add.reduce(features[pool].astype(np.float64), axis=0) / len(pool)


def seed_images(bank: FeatureBank, rows: np.ndarray) -> NearestImage:
    """The seed split's real images (8-bit, every category), for the distance to the nearest one.

    `NearestImage.rms` is the measure of `metrics.nearest_rms_pixel_distances` on images in
    f2m-ray's [-1, 1] range (0 for an exact copy), computed exactly on the stored 8-bit pixels,
    so a guard's verdict is the same on any machine, thread count or batch. The seed split is
    never empty (`resolve` refuses that).
    """
    return NearestImage(np.stack([decode_png(bank.images[r]) for r in rows]))


GUARD_KEYS = ("candidates", "rejected", "unmet")
COLUMNS = ("png", "seed_ids", "weights", "distance", "confidence", "attempt", "passed", "tried")


def guard_counts(columns: dict[str, list]) -> dict[str, int]:
    """Per-file guard statistics: candidates tried, rejected, and masses that passed no candidate."""
    samples = len(columns["attempt"])
    candidates = int(sum(columns["tried"]))
    return {
        "samples": samples,
        "candidates": candidates,
        "rejected": candidates - int(sum(columns["passed"])),  # every candidate not kept as passing
        "unmet": int(samples - sum(columns["passed"])),
    }


def _record(category: str, start: int, stop: int, rows: int, path: str = "", size: int = 0,
            guard: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    guard = guard or {}
    return {
        "candidates": np.array([guard.get("candidates", 0)], dtype=np.int64),
        "rejected": np.array([guard.get("rejected", 0)], dtype=np.int64),
        "unmet": np.array([guard.get("unmet", 0)], dtype=np.int64),
        "category": np.array([category]),
        "start": np.array([start], dtype=np.int64),
        "stop": np.array([stop], dtype=np.int64),
        "rows": np.array([rows], dtype=np.int64),
        "path": np.array([path]),
        "bytes": np.array([size], dtype=np.int64),
    }


@dataclass(frozen=True)
class ActorSpec:
    """What a ShardSynthesizer needs: the run resolved on the driver and its actor plan (both frozen and
    picklable: they travel to Ray workers; the model, bank and categories are not looked up again)."""

    run: ResolvedRun
    plan: ActorPlan


def actor_spec(run: ResolvedRun, actors: ActorPlan) -> ActorSpec:
    return ActorSpec(run, actors)
