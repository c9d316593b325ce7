"""Reader throughput: CBIS-DDSM-style DICOM ROIs through Ray Data vs one process.

Builds a synthetic CBIS-DDSM download (the archive's folder layout, uncompressed 16-bit
DICOM: full mammograms of --full-size, crops of about a fifth of that, binary masks as
large as the full image) and reads it four ways, the same per-row work each time
(f2m_ray.data.decode._load_roi: read, pick crop/mask by content, window, resize):

    (a) one process, a plain loop over the rows, --roi-source cropped
    (b) read_labeled(..., roi_source="cropped"): Ray Data tasks, materialized (Ray started before)
    (c) one process, --roi-source mask (decode the mask and the full image, cut the ROI)
    (d) read_labeled(..., roi_source="mask")

(a) and (c) run before and after the Ray reads, so that load from other processes on a
shared machine shows up as a spread rather than a bias.

    python benchmarks/reader_throughput.py                     # 48 cases, 1600x1200 full images
    python benchmarks/reader_throughput.py --cases 200 --full-size 3000 2000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(root: Path, cases: int, full_size: tuple[int, int]) -> Path:
    import csv

    from test_cbis_ddsm import HEADER, write_dicom

    rng = np.random.default_rng(0)
    rows, cols = full_size
    tree = root / "CBIS-DDSM"
    lines = []
    for k in range(cases):
        patient, view = f"P_{k // 2:05d}", ("CC", "MLO")[k % 2]
        full_case = f"Mass-Training_{patient}_LEFT_{view}"
        roi_case = full_case + "_1"
        uids = [f"1.3.6.1.4.1.9590.100.1.2.{9000000 + 10 * k + j}{10 * k + j:05d}" for j in range(5)]
        image = (20000 + 3000 * rng.standard_normal((rows, cols))).clip(0, 65535).astype(np.uint16)
        radius = min(rows, cols) // 10
        cy, cx = rows // 2, cols // 2
        yy, xx = np.ogrid[:rows, :cols]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image[disc] += 15000
        mask = (disc * 255).astype(np.uint8)
        crop = image[cy - radius - 20 : cy + radius + 20, cx - radius - 30 : cx + radius + 30]
        study = tree / full_case / f"07-20-2016-DDSM-{uids[0][-5:]}"
        write_dicom(study / f"1.000000-full mammogram images-{uids[1][-5:]}" / "1-1.dcm", image, 16, "full mammogram images")
        series = tree / roi_case / f"07-20-2016-DDSM-{uids[2][-5:]}" / f"1.000000-ROI mask images-{uids[3][-5:]}"
        crop_name, mask_name = ("1-1.dcm", "1-2.dcm") if k % 2 else ("1-2.dcm", "1-1.dcm")
        write_dicom(series / crop_name, crop, 16, "ROI mask images")
        write_dicom(series / mask_name, mask, 8, "ROI mask images")
        lines.append([patient, "3", "LEFT", view, "1", "mass", "IRREGULAR", "SPICULATED", "4", "MALIGNANT", "4",
                      f"{full_case}/{uids[0]}/{uids[1]}/000000.dcm",
                      f"{roi_case}/{uids[2]}/{uids[3]}/000000.dcm",
                      f"{roi_case}/{uids[2]}/{uids[3]}/000001.dcm\n"])
    csv_path = root / "mass_case_description_train_set.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(lines)
    return csv_path


def plain(csv_path: Path, roi_source: str) -> tuple[float, int]:
    """The readers' per-row work in one process; returns (seconds, rows)."""
    from f2m_ray.data import cbis_ddsm
    from f2m_ray.data.decode import DecodeOptions, _load_roi

    start = time.perf_counter()
    index = cbis_ddsm.DicomIndex.build(str(csv_path.parent))
    opts = DecodeOptions(roi_source=roi_source)
    n = 0
    for row in cbis_ddsm.read_case_rows(str(csv_path), roi_source):
        if roi_source == "cropped":
            crop, _ = index.resolve(row[cbis_ddsm.CROPPED_PATH], "crop")
            _load_roi("\n".join(crop), "", "", opts)
        else:
            mask, _ = index.resolve(row[cbis_ddsm.MASK_PATH], "mask")
            full, _ = index.resolve(row[cbis_ddsm.IMAGE_PATH], "full")
            _load_roi("", "\n".join(mask), "\n".join(full), opts)
        n += 1
    return time.perf_counter() - start, n


def ray_read(csv_path: Path, roi_source: str) -> tuple[float, int]:
    from f2m_ray.data.readers import read_labeled

    start = time.perf_counter()
    result = read_labeled(str(csv_path), roi_source=roi_source)
    return time.perf_counter() - start, result.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=48)
    parser.add_argument("--full-size", type=int, nargs=2, default=(1600, 1200), metavar=("ROWS", "COLS"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="f2mb", dir="/tmp"))
    root = Path(tempfile.mkdtemp(prefix="f2m-reader-bench-"))
    try:
        t0 = time.perf_counter()
        csv_path = build(root, args.cases, tuple(args.full_size))
        size = sum(f.stat().st_size for f in root.rglob("*.dcm")) / 1e6
        print(f"fixture: {args.cases} cases, full images {args.full_size[0]}x{args.full_size[1]} 16-bit, "
              f"{size:.0f} MB of DICOM, built in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs")
        from f2m_ray.runtime.cluster import ensure_ray

        ensure_ray()
        # Warm-up: imports in this process, Ray Data's first workers (reported, not compared).
        plain(csv_path, "cropped")
        cold = ray_read(csv_path, "cropped")
        print(f"first Ray Data read (cold workers): {cold[0]:.1f} s for {cold[1]} rows")
        results = {}
        for source in ("cropped", "mask"):
            before = plain(csv_path, source)
            ray_time = ray_read(csv_path, source)
            after = plain(csv_path, source)
            results[source] = (before, ray_time, after)
        print(f"{'ROI source':10s} {'plain (before / after)':>28s} {'Ray Data (warm)':>16s} {'ratio':>7s}")
        for source, (before, ray_time, after) in results.items():
            rate = lambda t: t[1] / t[0]  # noqa: E731
            plain_rate = (rate(before) + rate(after)) / 2
            print(f"{source:10s} {rate(before):9.1f} / {rate(after):6.1f} rows/s "
                  f"{rate(ray_time):9.1f} rows/s {rate(ray_time) / plain_rate:7.2f}x")
        print("(Ray Data times include the listing, planning, task start-up and materializing in the "
              "object store; the plain loop keeps its results in memory only)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
