"""Ray Job entry point for training on a cluster: the same options as `f2m-ray train`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --preset paper --data s3://bucket/rois/manifest.csv \
        --storage s3://bucket/runs --name paper-1

Inside a job, Ray is already running (RAY_ADDRESS is set), so the command joins the cluster.
The project must be installed on every node (cluster.yaml does that).
"""

from __future__ import annotations

import sys

from f2m_ray_cli.main import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
