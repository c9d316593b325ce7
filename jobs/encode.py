"""Ray Job entry point for the feature bank: the same options as `f2m-ray encode`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/encode.py --model s3://bucket/runs/paper-1 --data s3://bucket/rois/manifest.csv

`f2m-ray train` already leaves a bank beside its final checkpoint; this re-encodes, e.g.
with more labeled ROIs. The project must be installed on every node (cluster.yaml does that).
"""

from __future__ import annotations

import sys

from f2m_ray_cli.main import main

if __name__ == "__main__":
    main(["encode", *sys.argv[1:]])
