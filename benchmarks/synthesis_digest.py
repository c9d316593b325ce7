"""A fixed guarded synthesis and the sha256 of its Parquet bytes: a refactor that keeps this digest
kept every byte a user gets (plan, mixing, decoding, guards, judge scores, file layout and metadata).

    python benchmarks/synthesis_digest.py            # shipped model, 300 masses, a judge of fixed weights,
                                                     # label-confidence and seed-distance guards
"""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile

import torch

from f2m_ray.judge_model import Judge, JudgeConfig, JudgeTrainConfig, save_judge
from f2m_ray.synth.driver import synthesize
from f2m_ray.synth.plan import SynthesisConfig


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="f2m-digest-") as folder:
        judge = os.path.join(folder, "judge")
        torch.manual_seed(3)  # an untrained judge of fixed weights: its scores are what the guard reads
        save_judge(judge, Judge(JudgeConfig()), JudgeTrainConfig(), {})
        out = os.path.join(folder, "synthetic")
        synthesize(SynthesisConfig(categories=("spiculated-irregular",), n=300, out=out, model="pretrained", judge=judge,
                                   min_label_confidence=0.05, min_seed_distance=0.1, rows_per_file=100),
                   report=None, use_ray=False)
        digest = hashlib.sha256()
        files = sorted(glob.glob(f"{out}/**/*.parquet", recursive=True))
        for path in files:
            digest.update(open(path, "rb").read())
        print(f"{len(files)} files, digest {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
