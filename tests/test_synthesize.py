"""`synthesize`: sharded synthesis into Parquet, locally and on S3; determinism; resume; bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import polars
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from f2m_ray.checkpoint import load_checkpoint, save_checkpoint
from f2m_ray.config import PRESETS
from f2m_ray.errors import F2MError
from f2m_ray.bank import default_bank_path, load_feature_bank, write_feature_bank
from f2m_ray.labels import parse_category
from f2m_ray.core.networks import build_networks
from f2m_ray.data.phantom import generate_phantoms
from f2m_ray.core.images import to_model_range
from f2m_ray.data.rows import assign_split
from f2m_ray.core.images import to_uint8
from f2m_ray.schema import MANIFEST_NAME, SCHEMA_VERSION, decode_png, png_bytes
from f2m_ray.synth.driver import synthesize
from f2m_ray.synth.plan import SynthesisConfig, resolve
from f2m_ray.synthetic import SyntheticTorchDataset, open_synthetic, read_table
from f2m_ray_cli.main import _register, cli

CATEGORY = "spiculated-irregular"
OTHER = "circumscribed-oval"
SEEDS_PER_CATEGORY = 22  # more than K = 20


def make_checkpoint(path: str, seed: int = 0) -> str:
    """A random-init `tiny` checkpoint; weights widened so that decoded images vary."""
    torch.manual_seed(seed)
    nets = build_networks(PRESETS["tiny"].model)
    for module in nets[0].modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            torch.nn.init.normal_(module.weight, 0.0, 0.2)
    return save_checkpoint(path, PRESETS["tiny"], *nets, epoch=1, step=1)


TRAIN_STEPS = 60  # about 3 s on 2 cores: reconstruction L1 from 0.27 to about 0.11


def train_checkpoint(path: str, seed: int = 0) -> str:
    """A `tiny` checkpoint whose generator has been trained (briefly) to reconstruct the bank's phantoms.

    G alone, on the L1 term of eq. 5 (Adam, lr 2e-3, batches of 32): its BatchNorm statistics and
    weights are those of a decoder that draws masses, not of a random init, so a synthesis that
    mishandles either shows it. The discriminators stay as initialised.
    """
    torch.manual_seed(seed)
    nets = build_networks(PRESETS["tiny"].model)
    generator = nets[0]
    images, margins, shapes = _bank_phantoms()
    x, m, s = torch.from_numpy(images)[:, None], torch.from_numpy(margins), torch.from_numpy(shapes)
    optimizer = torch.optim.Adam(generator.parameters(), lr=2e-3)
    batches = torch.Generator().manual_seed(seed)
    for _ in range(TRAIN_STEPS):
        rows = torch.randint(0, len(x), (32,), generator=batches)
        loss = (generator(x[rows], m[rows], s[rows]) - x[rows]).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(path, PRESETS["tiny"], *nets, epoch=1, step=TRAIN_STEPS)


def _bank_phantoms() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 64, 64) in [-1, 1], margin ids, shape ids) of the test bank: phantoms of CATEGORY and OTHER."""
    rows = list(generate_phantoms(2 * SEEDS_PER_CATEGORY, 0, [parse_category(CATEGORY), parse_category(OTHER)]))
    images = np.stack([to_model_range(img) for _, img, _ in rows])
    return images, np.array([c.margin_id for *_, c in rows]), np.array([c.shape_id for *_, c in rows])


def make_bank(checkpoint: str, out: str | None = None) -> str:
    """A bank of phantoms of two categories, encoded in this process (no Ray needed)."""
    images, margins, shapes = _bank_phantoms()  # (N, 64, 64) in [-1, 1]
    ckpt = load_checkpoint(checkpoint)
    with torch.no_grad():
        features = ckpt.generator().encode(torch.from_numpy(images)[:, None], torch.from_numpy(margins),
                                           torch.from_numpy(shapes)).numpy()
    ids = np.array([f"roi-{i:04d}" for i in range(len(images))])
    return write_feature_bank(
        out or default_bank_path(checkpoint), ids, margins, shapes, np.array(assign_split(list(ids), 0.25, 0)),
        ids, np.array(["phantom"] * len(ids)), [png_bytes(to_uint8(i)) for i in images], features, ckpt.model_id,
        info={"checkpoint": checkpoint},
    )


@pytest.fixture(scope="module")
def model(trained_model):
    return trained_model


def config(model, out, **changes) -> SynthesisConfig:
    values = dict(categories=(CATEGORY,), n=1000, out=str(out), model=model, rows_per_file=250)
    values.update(changes)
    return SynthesisConfig(**values)


def by_index(table):
    return table.sort_by("sample_index")


@pytest.fixture(scope="module")
def local_run(model, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("local") / "dataset"
    summary = synthesize(config(model, out, workers=2), report=None)
    return out, summary


# ---------------------------------------------------------------- 1,000 rows locally


def check_rows(frame: pd.DataFrame, model: str) -> None:
    """What every synthetic row must satisfy, whatever read it."""
    assert len(frame) == 1000 and frame["sample_id"].nunique() == 1000
    assert sorted(frame["sample_index"]) == list(range(1000))
    assert set(frame["category"]) == {CATEGORY} and set(frame["margin"]) == {"spiculated"}
    assert set(frame["margin_id"]) == {4} and set(frame["shape_id"]) == {3}
    pool = load_feature_bank(default_bank_path(model)).pool(parse_category(CATEGORY))
    pool_ids = set(load_feature_bank(default_bank_path(model)).roi_id[pool])
    lengths = []
    for seeds, weights in zip(frame["seed_ids"], frame["weights"]):
        weights = np.asarray(weights)
        # only the seeds that carry weight: at most K = 20, distinct, of the category's pool
        assert 1 <= len(seeds) == len(weights) <= 20 and len(set(seeds)) == len(seeds) and set(seeds) <= pool_ids
        assert abs(weights.sum() - 1.0) < 1e-9 and np.all(weights > 0)
        np.testing.assert_allclose(weights * 20, np.round(weights * 20), atol=1e-9)  # the 0.05 grid
        lengths.append(len(seeds))
    assert 8 < np.mean(lengths) < 16  # Dirichlet(1) over 20 units in 20 parts: about 10.3 nonzero
    assert frame["label_confidence"].isna().all()
    assert (frame["nearest_seed_distance"] > 0).all()
    assert set(frame["model_id"]) == {load_checkpoint(model).model_id} and set(frame["run_seed"]) == {0}


def test_local_files_and_manifest(local_run, model):
    out, summary = local_run
    assert (summary.rows, summary.files, summary.written_rows) == (1000, 4, 1000)
    assert sorted(os.listdir(out)) == ["README.md", "_manifest.json", "_run.json", "croissant.json", "data"]
    assert os.listdir(out / "data") == [CATEGORY]
    names = sorted(os.listdir(out / "data" / CATEGORY))
    assert names == [f"part-{a:06d}-{a + 249:06d}.parquet" for a in (0, 250, 500, 750)]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["counts"] == {CATEGORY: 1000} and manifest["schema_version"] == SCHEMA_VERSION == 3
    assert manifest["model_id"] == load_checkpoint(model).model_id
    assert [f["path"] for f in manifest["files"]] == [f"data/{CATEGORY}/{n}" for n in names]
    assert manifest["arguments"]["k"] == 20 and manifest["arguments"]["seed"] == 0
    assert manifest["arguments"]["mixing"] == "variance-preserving" == manifest["fingerprint"]["mixing"]
    metadata = json.loads(pads.dataset(str(out / "data" / CATEGORY / names[0])).schema.metadata[b"f2m_ray"])
    assert metadata["run"]["mixing"] == "variance-preserving" and metadata["run"]["k"] == 20


def test_local_reads_back_everywhere(local_run, model):
    out, _ = local_run
    check_rows(read_table(str(out)).to_pandas(), model)  # the library
    # each reader's plain one-liner on OUT/data, as the README shows them: no flag to skip the card
    check_rows(pd.read_parquet(f"{out}/data"), model)
    check_rows(pd.read_parquet(f"{out}/data/{CATEGORY}"), model)  # one category's folder
    check_rows(pq.read_table(f"{out}/data").to_pandas(), model)
    check_rows(pads.dataset(f"{out}/data").to_table().to_pandas(), model)
    check_rows(polars.read_parquet(f"{out}/data").to_pandas(), model)
    counts = duckdb.sql(f"select count(*), count(distinct sample_id), min(category), max(category), "
                        f"max(abs(list_sum(weights) - 1)) from '{out}/data/**/*.parquet'").fetchall()[0]
    assert counts[:4] == (1000, 1000, CATEGORY, CATEGORY) and counts[4] < 1e-9
    dataset = open_synthetic(str(out))  # Ray Data, through the manifest
    assert dataset.count() == 1000 and "image" in dataset.schema().names
    import ray

    check_rows(ray.data.read_parquet(f"{out}/data").to_pandas(), model)  # Ray Data's own one-liner


def test_hugging_face_datasets_reads_the_image_column_as_images(local_run, tmp_path):
    import datasets

    out, _ = local_run
    files = sorted(str(p) for p in out.rglob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 1000 and type(ds.features["image"]).__name__ == "Image"
    image = ds[0]["image"]
    assert image.size == (64, 64) and image.mode == "L" and ds[0]["category"] == CATEGORY


def test_torch_dataset_gives_images_and_label_ids(local_run):
    out, _ = local_run
    data = SyntheticTorchDataset(str(out))
    image, margin, shape = data[7]
    assert len(data) == 1000 and image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert (margin, shape) == (4, 3) and -1.0 <= image.min() < image.max() <= 1.0
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=16)))
    assert batch[0].shape == (16, 1, 64, 64) and batch[1].tolist() == [4] * 16
    images = {bytes(b) for b in read_table(str(out), ["image"]).column("image").combine_chunks().field("bytes").to_pylist()}
    assert len(images) > 990  # an untrained but non-degenerate model: masses differ


# ---------------------------------------------------------------- determinism


SMALL = dict(n=1500, rows_per_file=50)  # 30 files: enough to kill a run half-way


@pytest.fixture(scope="module")
def one_actor(model, tmp_path_factory, ray_local):
    """An uninterrupted run with one actor: the reference for determinism and resume."""
    out = tmp_path_factory.mktemp("one") / "dataset"
    synthesize(config(model, out, workers=1, **SMALL), report=None)
    return out


def test_one_and_three_actors_give_identical_rows(model, one_actor, local_run, tmp_path):
    one = by_index(read_table(str(one_actor)))
    three = by_index(read_table(str(synthesize(config(model, tmp_path / "three", workers=3, **SMALL),
                                               report=None).out)))
    # Also the 1,000-row run (2 actors, 250-row files): the same samples where they overlap.
    thousand = by_index(read_table(str(local_run[0])))
    for column in ("sample_id", "seed_ids", "weights", "image", "nearest_seed_distance"):
        assert one.column(column).to_pylist() == three.column(column).to_pylist(), column
        assert one.column(column).to_pylist()[:1000] == thousand.column(column).to_pylist(), column


def _pixel_spread(out) -> float:
    """Mean per-pixel standard deviation over the dataset's decoded images."""
    images = np.stack([np.asarray(img, dtype=np.float64) for img, _, _ in SyntheticTorchDataset(str(out))])
    return float(images.std(axis=0).mean())


def test_schemes_share_plans_and_the_variance_preserving_one_keeps_the_spread(model, tmp_path):
    runs = {}
    for name in ("paper", "variance-preserving", "sparse"):
        out = tmp_path / name
        synthesize(config(model, out, n=200, rows_per_file=200, mixing=name), report=None, use_ray=False)
        runs[name] = by_index(read_table(str(out)))
    paper, preserving, sparse = (runs[n] for n in ("paper", "variance-preserving", "sparse"))
    # the same seeds and weights, combined differently: other images
    assert paper.column("seed_ids").to_pylist() == preserving.column("seed_ids").to_pylist()
    assert paper.column("weights").to_pylist() == preserving.column("weights").to_pylist()
    assert paper.column("image").to_pylist() != preserving.column("image").to_pylist()
    assert max(len(s) for s in sparse.column("seed_ids").to_pylist()) <= 3
    spread = {name: _pixel_spread(tmp_path / name) for name in runs}
    assert spread["variance-preserving"] > 1.3 * spread["paper"], spread
    assert spread["sparse"] > 1.3 * spread["paper"], spread


def test_a_trained_models_masses_sit_near_real_masses_and_a_random_models_do_not(model, tmp_path):
    """What the synthesis tests run on is a decoder that draws masses: its mixes land among the phantoms."""
    untrained = make_checkpoint(str(tmp_path / "random-model"))
    make_bank(untrained)
    distance = {}
    for name, checkpoint in (("trained", model), ("random", untrained)):
        out = tmp_path / name
        synthesize(config(checkpoint, out, n=100, rows_per_file=100), report=None, use_ray=False)
        distance[name] = float(np.median(read_table(str(out)).column("nearest_seed_distance").to_numpy()))
    assert distance["trained"] < 0.25 and distance["trained"] < 0.3 * distance["random"], distance


def test_unknown_mixing_scheme_is_one_line(model, tmp_path):
    _register()
    result = CliRunner().invoke(cli, ["synthesize", "--category", CATEGORY, "--n", "10", "--out",
                                      str(tmp_path / "x"), "--model", model, "--mixing", "convex"])
    assert result.exit_code == 2 and "'convex' is not one of 'paper', 'variance-preserving', 'sparse'" in result.output
    assert not (tmp_path / "x").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_bytes(model, one_actor, tmp_path, ray_local):
    args = ["synthesize", "--category", CATEGORY, "--n", str(SMALL["n"]), "--rows-per-file",
            str(SMALL["rows_per_file"]), "--model", model, "--workers", "1"]
    killed = tmp_path / "killed"
    # A second driver on this session's Ray cluster, killed hard once two files exist.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    process = subprocess.Popen([sys.executable, "-m", "f2m_ray_cli", *args, "--out", str(killed)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = killed / "data" / CATEGORY
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if folder.exists() and len([n for n in os.listdir(folder) if n.startswith("part-")]) >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = [n for n in os.listdir(folder) if n.startswith("part-")]
    assert 2 <= len(done) < 30, "the run was not interrupted mid-way"
    assert not (killed / MANIFEST_NAME).exists()  # unfinished: no manifest
    with pytest.raises(F2MError, match="unfinished synthetic dataset"):
        read_table(str(killed))
    summary = synthesize(config(model, killed, workers=2, resume=True, **SMALL), report=None)
    assert summary.files == 30 and summary.written_files <= 30 - len(done) + 1  # + a file being written at the kill
    reference = one_actor / "data" / CATEGORY
    assert sorted(os.listdir(folder)) == sorted(os.listdir(reference))
    for name in os.listdir(reference):
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name


# ---------------------------------------------------------------- S3


@pytest.mark.s3
def test_s3_through_the_command_line(model, s3_bucket, local_run, ray_local, tmp_path):
    import boto3

    out = f"{s3_bucket}/synthetic/run1"
    _register()
    result = CliRunner().invoke(cli, ["synthesize", "--category", "spiculate-irregular", "--n", "1000",
                                      "--rows-per-file", "500", "--model", model, "--out", out, "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote 1000 masses in 2 files" in result.stdout and "actor(s)" in result.stderr
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket[5:])["Contents"])
    assert keys == ["synthetic/run1/README.md", "synthetic/run1/_manifest.json", "synthetic/run1/_run.json",
                    "synthetic/run1/croissant.json",
                    f"synthetic/run1/data/{CATEGORY}/part-000000-000499.parquet",
                    f"synthetic/run1/data/{CATEGORY}/part-000500-000999.parquet"]  # no directory markers
    table = read_table(out)
    check_rows(table.to_pandas(), model)
    assert open_synthetic(out).count() == 1000
    options = {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    check_rows(pd.read_parquet(f"{out}/data", storage_options=options), model)
    from f2m_ray.storage import arrow_filesystem

    fs, inner = arrow_filesystem(out)
    arrow = pads.dataset(f"{inner}/data", filesystem=fs).to_table()
    check_rows(arrow.to_pandas(), model)
    assert duckdb.sql("select count(distinct sample_id) from arrow").fetchall() == [(1000,)]
    # Other file layout, same samples: the bytes equal those of the local run.
    local = by_index(read_table(str(local_run[0])))
    assert by_index(table).column("image").to_pylist() == local.column("image").to_pylist()
    inspected = CliRunner().invoke(cli, ["inspect", out, "--sheet", str(tmp_path / "sheet.png")])
    assert inspected.exit_code == 0 and f"{CATEGORY}" in inspected.stdout and "1000" in inspected.stdout
    assert (tmp_path / "sheet.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- bad input


def test_too_few_seeds(model, tmp_path):
    run = resolve(config(model, tmp_path / "o", k=30))
    assert run.categories[0].k_used == 22
    assert run.notes == (f"{CATEGORY} has only 22 seeds, fewer than K=30: each sample mixes all 22",)
    with pytest.raises(F2MError, match="spiculated-round has 0 seed\\(s\\).*at least 2"):
        resolve(config(model, tmp_path / "o", categories=("spiculated-round",)))
    with pytest.raises(F2MError, match="unknown category 'spiky'.*spiculated"):
        resolve(config(model, tmp_path / "o", categories=("spiky",)))
    with pytest.raises(F2MError, match="--n must be a positive"):
        resolve(config(model, tmp_path / "o", n=0))
    assert [p.category.name for p in resolve(config(model, tmp_path / "o", categories=("all",))).categories] == [
        "circumscribed-oval", CATEGORY]


def test_model_and_bank_must_match(model, tmp_path):
    other = make_checkpoint(str(tmp_path / "other"), seed=1)
    with pytest.raises(F2MError, match="was encoded by model .*f2m-ray encode"):
        resolve(config(other, tmp_path / "o", bank=default_bank_path(model)))
    with pytest.raises(F2MError, match="no feature bank at"):
        resolve(config(other, tmp_path / "o"))
    import pyarrow.parquet as pq

    table = pq.read_table(default_bank_path(model))
    meta = json.loads(table.schema.metadata[b"f2m_ray_bank"])
    meta["vocabulary"]["margins"] = ["smooth", "rough"]
    pq.write_table(table.replace_schema_metadata({b"f2m_ray_bank": json.dumps(meta).encode()}), tmp_path / "b.parquet")
    with pytest.raises(F2MError, match="another BI-RADS vocabulary"):
        resolve(config(model, tmp_path / "o", bank=str(tmp_path / "b.parquet")))
    # --bank alone finds its checkpoint.
    assert resolve(config(None, tmp_path / "o", bank=default_bank_path(model))).model_id == load_checkpoint(model).model_id


def test_existing_output_is_protected(model, tmp_path, local_run):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(F2MError, match="is not empty .*--resume.*--overwrite"):
        synthesize(config(model, busy), report=None)
    with pytest.raises(F2MError, match="not an f2m-ray synthetic dataset; refusing"):
        synthesize(config(model, busy, overwrite=True), report=None)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(F2MError, match="holds another run \\(seed 0 there vs 5 now\\)"):
        synthesize(config(model, local_run[0], seed=5, workers=2, resume=True), report=None)
    assert (local_run[0] / MANIFEST_NAME).exists()  # a refused resume leaves the finished dataset as it was
    again = synthesize(config(model, local_run[0], workers=2, resume=True), report=None)
    assert again.written_files == 0 and again.rows == 1000


def test_overwrite_never_deletes_what_a_run_did_not_write(model, tmp_path):
    project = tmp_path / "my_project"
    project.mkdir()
    (project / "precious.txt").write_text("mine")
    (project / "_manifest.json").write_text("{}")  # not one f2m-ray wrote
    with pytest.raises(F2MError, match="not an f2m-ray synthetic dataset; refusing"):
        synthesize(config(model, project, n=20, overwrite=True), report=None, use_ray=False)
    assert (project / "precious.txt").read_text() == "mine" and (project / "_manifest.json").read_text() == "{}"
    # a real dataset with a user's file beside it: refused, nothing removed
    out = tmp_path / "syn"
    synthesize(config(model, out, n=20, rows_per_file=20), report=None, use_ray=False)
    (out / "precious.txt").write_text("mine")
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(F2MError, match=r"also holds 1 file that is not part of a synthetic dataset \(e.g. precious.txt\)"):
        synthesize(config(model, out, n=20, rows_per_file=20, overwrite=True, seed=3), report=None, use_ray=False)
    assert sorted(p.name for p in out.rglob("*")) == before and (out / MANIFEST_NAME).exists()
    (out / "precious.txt").unlink()
    again = synthesize(config(model, out, n=20, rows_per_file=20, overwrite=True, seed=3), report=None, use_ray=False)
    assert again.written_files == 1 and json.loads((out / MANIFEST_NAME).read_text())["arguments"]["seed"] == 3


@pytest.mark.s3
def test_unreachable_s3_is_one_line(model, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    _register()
    result = CliRunner().invoke(cli, ["synthesize", "--category", CATEGORY, "--n", "10", "--model", model,
                                      "--out", "s3://bucket/prefix"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"cannot reach S3 at http://127.0.0.1:{port}" in lines[0]


@pytest.mark.s3
def test_unauthorised_s3_is_one_line(model, tmp_path):
    """A second loopback S3 server that checks credentials refuses ours."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "moto did not start"
                time.sleep(0.2)
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "nobody",
               "AWS_SECRET_ACCESS_KEY": "wrong"}
        _register()
        result = CliRunner(env=env).invoke(cli, ["synthesize", "--category", CATEGORY, "--n", "10", "--model", model,
                                                 "--out", "s3://bucket/prefix"])
    finally:
        server.terminate()
        server.wait(timeout=10)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "S3 refused access" in lines[0] and "check the credentials" in lines[0]


def test_dry_run_prints_the_resolved_run(model, tmp_path):
    _register()
    result = CliRunner().invoke(cli, ["synthesize", "--category", "all", "--n", "50", "--model", model,
                                      "--out", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "category    circumscribed-oval: 50 masses from 22 seeds (K used 20)" in result.stdout
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- where the work runs


def test_auto_runs_short_work_in_this_process_and_long_work_on_ray(model, tmp_path, monkeypatch, ray_local):
    from f2m_ray.synth import driver

    _register()
    args = ["synthesize", "--category", CATEGORY, "--n", "300", "--rows-per-file", "150", "--model", model]
    short = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "short")])
    assert short.exit_code == 0, short.output
    assert "masses in 2 files in this process on cpu (about 1 s of work: less than starting Ray" in short.stderr
    assert "actor(s)" not in short.stderr
    monkeypatch.setattr(driver, "IN_PROCESS_MAX_SECONDS", 0.0)  # any work is now longer than Ray's start-up
    long = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "long")])
    assert long.exit_code == 0, long.output
    assert "synthesizing 300 masses in 2 files with 2 actor(s)" in long.stderr and "in this process" not in long.stderr
    forced = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "forced"), "--executor", "in-process"])
    assert forced.exit_code == 0 and "in this process on cpu\n" in forced.stderr  # no reason: it was asked for
    tables = [by_index(read_table(str(tmp_path / name))) for name in ("short", "long", "forced")]
    assert tables[0].column("image").to_pylist() == tables[1].column("image").to_pylist()
    assert tables[0].column("image").to_pylist() == tables[2].column("image").to_pylist()


def test_a_named_cluster_or_an_actor_count_means_ray_without_a_trial(model, tmp_path, monkeypatch):
    from f2m_ray.synth import driver

    run = resolve(config(model, tmp_path / "x", n=10, rows_per_file=10))
    built = []
    monkeypatch.setattr(driver, "_in_process_synthesizer", lambda run: built.append(run))
    assert driver.choose_executor(resolve(config(model, tmp_path / "x", workers=1)), list(run.shards))[:2] == (True, None)
    big = resolve(config(model, tmp_path / "x", n=200_000, rows_per_file=100_000))
    assert driver.choose_executor(big, list(big.shards)) == (True, None, "200000 masses: Ray's actors share them")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert driver.choose_executor(run, list(run.shards)) == (True, None, "the Ray cluster in RAY_ADDRESS")
    assert built == []


def test_an_error_inside_a_ray_actor_reads_as_the_same_line_as_in_this_process(model, tmp_path, ray_local):
    """The bank changes between the driver's checks and the actor's start: one line, the same either way."""
    import pyarrow.parquet as pq

    bank = default_bank_path(model)
    original = open(bank, "rb").read()
    table = pq.read_table(bank)
    features = table.column("feature").to_pylist()
    features[0] = [x + 1.0 for x in features[0]]
    index = table.schema.get_field_index("feature")
    pq.write_table(table.set_column(index, table.schema.field("feature"),
                                    pa.array(features, type=table.schema.field("feature").type)), tmp_path / "changed")
    changed = (tmp_path / "changed").read_bytes()

    def swap_the_bank(line: str) -> None:  # called once the run is resolved and before any actor starts
        if line.startswith("model:"):
            open(bank, "wb").write(changed)

    lines = {}
    for use_ray in (False, True):
        try:
            with pytest.raises(F2MError) as failure:
                synthesize(config(model, tmp_path / f"ray-{use_ray}", n=50, rows_per_file=50,
                                  workers=1 if use_ray else None), report=swap_the_bank, use_ray=use_ray)
        finally:
            open(bank, "wb").write(original)
        lines[use_ray] = str(failure.value)
    assert lines[True] == lines[False] == (f"synthesis failed: the feature bank {bank} changed during the run; "
                                           f"0 finished files are kept, run again with --resume once fixed")


# ---------------------------------------------------------------- the dataset card, defaults


def test_the_folder_is_a_hugging_face_dataset_with_a_config_per_category(model, tmp_path):
    import datasets

    out = tmp_path / "two"
    synthesize(config(model, out, categories=(CATEGORY, OTHER), n=40, rows_per_file=25), report=None, use_ray=False)
    card = (out / "README.md").read_text()
    header = card.split("---\n")[1]
    assert card.startswith("---\n") and header.count("config_name:") == 3 and "default: true" in header
    assert f'path: "data/{OTHER}/part-*.parquet"' in header and "dtype: image" in header and "list: string" in header
    assert "| spiculated-irregular | 40 |" in card and "mixing `variance-preserving`" in card
    cache = str(tmp_path / "hf")
    everything = datasets.load_dataset(str(out), split="train", cache_dir=cache)
    assert everything.num_rows == 80 and type(everything.features["image"]).__name__ == "Image"
    assert sorted(set(everything["category"])) == [OTHER, CATEGORY]
    one = datasets.load_dataset(str(out), OTHER, split="train", cache_dir=cache)
    assert one.num_rows == 40 and set(one["category"]) == {OTHER} and one[3]["image"].size == (64, 64)
    # the fields the hub expects of a card
    for line in ('license: other', 'license_link: "README.md#license"', "annotations_creators:\n- machine-generated",
                 'source_datasets:\n- "original"', "task_categories:\n- image-classification", "size_categories:\n- n<1K"):
        assert line in header, line
    assert "## License" in card and "They carry the terms of that data" in card


def test_croissant_validates_and_its_records_are_the_rows(model, tmp_path):
    import mlcroissant

    out = tmp_path / "two"
    synthesize(config(model, out, categories=(CATEGORY, OTHER), n=30, rows_per_file=20), report=None, use_ray=False)
    description = json.loads((out / "croissant.json").read_text())
    assert description["rai:dataCollectionType"] == ["Synthetic data"]
    assert "no memorization or label guard" in description["rai:personalSensitiveInformation"].lower()
    records = list(mlcroissant.Dataset(jsonld=str(out / "croissant.json")).records("masses"))  # validates first
    table = read_table(str(out)).to_pandas().set_index("sample_id")
    assert len(records) == 60 == len(table)
    for record in records[::7]:
        row = table.loc[record["masses/sample_id"].decode()]
        assert record["masses/category"].decode() == row["category"] and record["masses/margin_id"] == row["margin_id"]
        assert record["masses/shape"].decode() == row["shape"]
        assert np.array_equal(np.asarray(record["masses/image"]), decode_png(row["image"]["bytes"]))


def test_overwrite_replaces_its_card_but_refuses_a_users_readme(model, tmp_path):
    out = tmp_path / "d"
    synthesize(config(model, out, n=20, rows_per_file=20), report=None, use_ray=False)
    synthesize(config(model, out, n=30, rows_per_file=30, overwrite=True), report=None, use_ray=False)
    assert "| spiculated-irregular | 30 |" in (out / "README.md").read_text()
    (out / "README.md").write_text("# my notes about this folder\n")
    with pytest.raises(F2MError, match="not part of a synthetic dataset .e.g. README.md"):
        synthesize(config(model, out, n=30, rows_per_file=30, overwrite=True), report=None, use_ray=False)
    assert (out / "README.md").read_text() == "# my notes about this folder\n"


def _finished_run(storage, name: str, model_path: str) -> str:
    """A run folder as `train` leaves it: checkpoint_* with the bank beside it."""
    import shutil

    target = storage / name / "checkpoint_epoch_000001"
    shutil.copytree(model_path, target)
    return str(target)


def test_without_model_or_out_the_newest_finished_run_is_used(model, tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.chdir(tmp_path)
    older = _finished_run(tmp_path / "f2m-runs", "older", model)
    time.sleep(0.02)
    newer = _finished_run(tmp_path / "f2m-runs", "newer", model)
    os.utime(os.path.join(older, "feature_bank.parquet"), (1, 1))  # written long ago
    (tmp_path / "f2m-runs" / "unfinished" / "checkpoint_epoch_000002").mkdir(parents=True)  # no checkpoint in it
    lines: list[str] = []
    synthesize(SynthesisConfig(categories=(CATEGORY,), n=20, rows_per_file=20), report=lines.append, use_ray=False)
    assert lines[0] == f"model: {newer} (id {resolve(config(model, 'x')).model_id}; the newest finished run under f2m-runs)"
    assert len(SyntheticTorchDataset(str(tmp_path / "f2m-synthetic"))) == 20
    monkeypatch.setenv("F2M_STORAGE", str(tmp_path / "elsewhere"))  # no runs there: the shipped model, or a clear line
    from f2m_ray.pretrained import shipped_models

    if shipped_models():
        assert "the shipped model small-phantom" in resolve(SynthesisConfig(categories=(CATEGORY,), n=1)).model_source
    else:
        with pytest.raises(F2MError, match="no finished run under .*elsewhere and no shipped model"):
            resolve(SynthesisConfig(categories=(CATEGORY,), n=1))


# ---------------------------------------------------------------- decode precision (the shipped, trained model)


def _labeled_images(out) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, margin ids, shape ids) of every row of every category, in sample id order."""
    table = read_table(str(out), ["sample_id", "image", "margin_id", "shape_id"]).sort_by("sample_id")
    images = np.stack([decode_png(b) for b in table.column("image").combine_chunks().field("bytes").to_pylist()])
    return images, table.column("margin_id").to_numpy(), table.column("shape_id").to_numpy()


PRECISION_CATEGORIES = ("spiculated-irregular", "circumscribed-oval", "ill-defined-round")


def test_bf16_decoding_stays_within_a_grey_level_keeps_the_labels_and_is_its_own_run(tmp_path):
    """The shipped model (trained) decoded in fp32 and bf16: images within a grey level (PSNR > 50 dB), and a
    judge trained on phantoms reads nine masses in ten or more the same way in both, and label fidelity moves by
    less than 0.01."""
    from f2m_ray import judge_model
    from f2m_ray.evaluation import judge as judge_module
    from test_judge import TINY as TINY_JUDGE

    shipped = dict(categories=PRECISION_CATEGORIES, n=128, model="pretrained", rows_per_file=128)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        synthesize(SynthesisConfig(out=str(tmp_path / "fp32"), precision="fp32", **shipped), report=None, use_ray=False)
        synthesize(SynthesisConfig(out=str(tmp_path / "bf16"), precision="bf16", **shipped), report=None, use_ray=False)
        torch.set_num_threads(2)  # another thread count (as another actor plan): the same bytes
        synthesize(SynthesisConfig(out=str(tmp_path / "bf16-2"), precision="bf16", **shipped), report=None,
                   use_ray=False)
        torch.set_num_threads(1)
        rows = list(generate_phantoms(600, 3))
        ids = np.array([f"phantom-{i:06d}" for i, _, _ in rows])
        data = judge_module.LabeledArrays(ids, to_model_range(np.stack([im for _, im, _ in rows])),
                                          np.array([c.margin_id for *_, c in rows]),
                                          np.array([c.shape_id for *_, c in rows]), np.array(["train"] * len(rows)))
        judge, _ = judge_module.train_judge(data, TINY_JUDGE, judge_model.JudgeTrainConfig(epochs=3, batch_size=32,
                                                                                           lr=3e-3, seed=0))
        decoded = {name: _labeled_images(tmp_path / name) for name in ("fp32", "bf16", "bf16-2")}
        fidelity, read = {}, {}
        for name in ("fp32", "bf16"):
            images, margins, shapes = decoded[name]
            predicted = judge_model.predict(judge, to_model_range(images))
            fidelity[name] = float(np.mean((predicted.margin == margins) & (predicted.shape == shapes)))
            read[name] = predicted.margin * 10 + predicted.shape
    finally:
        torch.set_num_threads(previous)
    fp32, bf16 = (decoded[name][0].astype(np.int16) for name in ("fp32", "bf16"))
    difference = np.abs(fp32 - bf16)
    psnr = 10 * np.log10(255.0 ** 2 / np.mean(difference.astype(np.float64) ** 2))
    assert difference.mean() < 0.25 and difference.max() <= 2 and psnr > 50, (difference.mean(), difference.max(), psnr)
    assert 0 < (difference > 0).mean() < 0.2  # bf16 really ran: some pixels differ
    assert len(set(read["fp32"])) >= 3  # the judge tells these masses apart: a change could show
    assert np.mean(read["bf16"] == read["fp32"]) >= 0.9 and abs(fidelity["bf16"] - fidelity["fp32"]) < 0.01, fidelity
    assert np.array_equal(decoded["bf16-2"][0], decoded["bf16"][0])
    fingerprints = [json.loads((tmp_path / name / "_run.json").read_text())["fingerprint"] for name in ("fp32", "bf16")]
    assert [f["precision"] for f in fingerprints] == ["fp32", "bf16"]
    with pytest.raises(F2MError, match="cannot resume in .* it holds another run"):
        synthesize(SynthesisConfig(out=str(tmp_path / "bf16"), precision="fp32", resume=True, **shipped), report=None,
                   use_ray=False)
    with pytest.raises(F2MError, match="--precision must be one of auto, fp32, bf16, got 'fp16'"):
        resolve(SynthesisConfig(out=str(tmp_path / "x"), precision="fp16", **shipped))


def test_the_card_and_croissant_name_the_data_behind_the_masses():
    from f2m_ray.croissant import croissant
    from f2m_ray.dataset_card import card_text
    from f2m_ray.schema import HF_FEATURES

    base = {"counts": {CATEGORY: 5}, "arguments": {"k": 20}, "guards": {}, "tool_version": "0", "schema_version": 3}
    phantom = {**base, "provenance": {"model_training_data": "phantom:2000", "seed_data": "phantom:2000",
                                      "seed_data_description": "2000 phantoms (seed 0, 20 categories)"}}
    card = card_text(phantom, HF_FEATURES)
    assert 'source_datasets:\n- "original"\n' in card
    assert "trained on procedural phantoms (phantom:2000), no patient data" in card
    real = {**base, "provenance": {"model_training_data": "cbis-ddsm:/data/CBIS", "seed_data": "/data/manifest.csv",
                                   "seed_data_description": "1,231 ROIs of /data/manifest.csv"}}
    card = card_text(real, HF_FEATURES)
    assert 'source_datasets:\n- "extended|cbis-ddsm"\n- "extended|/data/manifest.csv"\n' in card
    assert "no patient data" not in card and "trained on cbis-ddsm:/data/CBIS" in card
    described = croissant(real)
    assert "1,231 ROIs of /data/manifest.csv" in described["rai:personalSensitiveInformation"]
    assert "The model was trained on: cbis-ddsm:/data/CBIS." in described["rai:dataCollection"]


def test_the_model_is_found_once_on_the_driver_and_the_actor_gets_typed_values(model, tmp_path, monkeypatch):
    import pickle

    from f2m_ray import checkpoint
    from f2m_ray.core.mixing import Scheme
    from f2m_ray.labels import Category
    from f2m_ray.runtime.actors import ActorPlan
    from f2m_ray.synth.actor import actor_spec

    calls = {"find": 0, "metadata": 0}
    find, read = checkpoint.find_checkpoint, checkpoint._read_meta

    def counted_find(path):
        calls["find"] += 1
        return find(path)

    def counted_read(fs, root):
        calls["metadata"] += 1
        return read(fs, root)

    monkeypatch.setattr(checkpoint, "find_checkpoint", counted_find)
    monkeypatch.setattr(checkpoint, "_read_meta", counted_read)
    synthesize(config(model, tmp_path / "o", n=20, rows_per_file=10), report=None, use_ray=False)
    # found once (the driver); metadata read by the driver's resolution, its weight check and the one actor's check
    assert calls == {"find": 1, "metadata": 3}
    spec = actor_spec(resolve(config(model, tmp_path / "p", n=20)), ActorPlan(1, 1, 1.0, 0.0))
    assert isinstance(spec.run.scheme, Scheme) and spec.run.scheme.name == "variance-preserving"
    assert [type(p.category) for p in spec.run.categories] == [Category]
    assert spec.run.out_dir == str(tmp_path / "p") and pickle.loads(pickle.dumps(spec)) == spec
