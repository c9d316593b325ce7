"""Ray Job entry point for synthesis on a cluster: the same options as `f2m-ray synthesize`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/synthesize.py --model s3://bucket/runs/paper-1 \
        --category spiculated-irregular --n 100000 --out s3://bucket/synthetic/spic-irr

Inside a job, Ray is already running (RAY_ADDRESS is set), so the command joins the cluster
and uses one decoder actor per GPU (or one per core on a CPU-only cluster).
The project must be installed on every node (cluster.yaml does that).
"""

from __future__ import annotations

import sys

from f2m_ray_cli.main import main

if __name__ == "__main__":
    main(["synthesize", *sys.argv[1:]])
