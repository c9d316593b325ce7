"""A corpus of bad inputs, one table: every one is refused in at most 3 lines on stderr, naming its cause,
with a non-zero exit and no traceback, and a finished dataset in --out is left byte for byte as it was.

Each case runs the real command line (in this process, through click's runner) from a working
directory holding the artifacts below (relative paths, as a user types them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from f2m_ray.pretrained import shipped_model
from f2m_ray.synth.driver import synthesize
from f2m_ray.synth.plan import SynthesisConfig

CATEGORY = "spiculated-irregular"
SYN = ["synthesize", "--category", CATEGORY, "--n", "20", "--model", "pretrained"]


def _png(width: int, height: int, bit_depth: int = 8, pixels: bytes | None = None) -> bytes:
    """A PNG with the IHDR it says; its pixel data only as long as asked (a bomb declares more than it holds)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    raw = pixels if pixels is not None else b"".join(b"\0" + b"\0" * (width * bit_depth // 8) for _ in range(height))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


class Payload:
    """Unpickled, it would create a file: the proof that loading ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    synthesize(SynthesisConfig(categories=(CATEGORY,), n=20, out=str(root / "done"), model="pretrained",
                               rows_per_file=20), report=None, use_ray=False)
    shipped = Path(shipped_model())
    for name, change in (("corrupt", lambda p: p.write_bytes(os.urandom(4096))),
                         ("truncated", lambda p: p.write_bytes(p.read_bytes()[:1000]))):
        shutil.copytree(shipped, root / name)
        change(root / name / "model.pt")
    (root / "foreign").mkdir()
    (root / "foreign" / "f2m_checkpoint.json").write_text(json.dumps({"format": "someone-elses-model"}))
    shutil.copytree(shipped, root / "vocab")
    meta = json.loads((root / "vocab" / "f2m_checkpoint.json").read_text())
    meta["vocabulary"]["margins"] = list(reversed(meta["vocabulary"]["margins"]))
    (root / "vocab" / "f2m_checkpoint.json").write_text(json.dumps(meta))
    (root / "judge").mkdir()
    (root / "judge" / "f2m_judge.json").write_text("{not json")
    from f2m_ray import judge_model
    from f2m_ray.evaluation import judge as judge_module

    narrow_judge = judge_model.JudgeConfig(stem_channels=4, channels=(4, 4, 4, 4))
    judge_model.save_judge(str(root / "judge_ok"), judge_module.new_judge(narrow_judge, seed=0),
                            judge_model.JudgeTrainConfig(steps=1), {}, data="random init")
    (root / "empty.csv").write_text("")
    (root / "headerless.csv").write_text("a.png,spiculated,irregular\n")
    (root / "columns.csv").write_text("file,label\na.png,x\n")
    (root / "text.png").write_text("this is not an image\n")
    (root / "tiny.png").write_bytes(_png(1, 1))
    (root / "bomb.png").write_bytes(_png(60_000, 60_000, pixels=b"\0" * 1000))
    (root / "images.csv").write_text("path,margin,shape\n" + "".join(
        f"{name},spiculated,irregular\n" for name in ("text.png", "tiny.png", "bomb.png", "missing.png")))
    (root / "run.toml").write_text('preset = "tiny"\n[train]\nepochs = 2\nlearning_rate = 0.1\n')
    (root / "a_file").write_text("x")
    import pyarrow.parquet as pq

    table = pq.read_table(shipped / "feature_bank.parquet")
    features = np.array(table.column("feature").to_pylist(), dtype=np.float32)
    features[3, 7] = np.nan
    import pyarrow as pa

    column = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float32()), features.shape[1])
    index = table.schema.get_field_index("feature")
    pq.write_table(table.set_column(index, table.schema.field("feature"), column), root / "nan_bank.parquet")
    # A bank that claims another model: the shipped bank's rows under another model id.
    meta = dict(table.schema.metadata or {})
    for key, value in meta.items():
        try:
            info = json.loads(value)
        except ValueError:
            continue
        if isinstance(info, dict) and "model_id" in info:
            meta[key] = json.dumps({**info, "model_id": "0123456789abcdef"}).encode()
    pq.write_table(table.replace_schema_metadata(meta), root / "other_model_bank.parquet")
    # Files crafted to run code when unpickled: loading must refuse them without running it.
    payload = Payload(str(root / "pwned"))
    import pickle

    (root / "pickle_bank.parquet").write_bytes(pickle.dumps(payload))
    shutil.copytree(root / "judge_ok", root / "judge_payload")
    import torch

    torch.save({"conv": payload}, root / "judge_payload" / "judge.pt")
    shutil.copytree(root / "judge_ok", root / "judge_vocab")
    judge_meta = json.loads((root / "judge_vocab" / "f2m_judge.json").read_text())
    judge_meta["vocabulary"]["shapes"] = list(reversed(judge_meta["vocabulary"]["shapes"]))
    (root / "judge_vocab" / "f2m_judge.json").write_text(json.dumps(judge_meta))
    narrow = np.nan_to_num(features[:, :64])
    column = pa.FixedSizeListArray.from_arrays(pa.array(narrow.reshape(-1), pa.float32()), 64)
    pq.write_table(table.set_column(index, pa.field("feature", column.type), column), root / "narrow_bank.parquet")
    return root


CASES = [
    # (id, arguments, what the one line must name)
    ("n-zero", SYN[:4] + ["0", "--out", "done", "--overwrite"], "--n must be a positive number"),
    ("n-negative", SYN[:4] + ["-5", "--out", "done", "--overwrite"], "--n must be a positive number"),
    ("n-huge", SYN[:4] + [str(10**12), "--out", "done", "--overwrite"], "more than the 1,000,000,000 masses"),
    ("k-one", SYN + ["--k", "1", "--out", "done", "--overwrite"], "--k must be at least 2"),
    ("step-off-grid", SYN + ["--step", "0.07", "--out", "done", "--overwrite"], "0.07"),
    ("alpha-zero", SYN + ["--alpha", "0", "--out", "done", "--overwrite"], "--alpha must be a number > 0"),
    ("alpha-negative", SYN + ["--alpha", "-1", "--out", "done", "--overwrite"], "--alpha must be a number > 0"),
    ("alpha-nan", SYN + ["--alpha", "nan", "--out", "done", "--overwrite"], "--alpha must be a number > 0, got nan"),
    ("rows-per-file-zero", SYN + ["--rows-per-file", "0", "--out", "done", "--overwrite"], "--rows-per-file must be positive"),
    ("workers-zero", SYN + ["--workers", "0", "--out", "done", "--overwrite"], "--workers must be positive"),
    ("workers-beyond-the-cluster", SYN + ["--workers", "1000", "--out", "done", "--overwrite"],
     "--workers 1000 needs 1000 CPU slots"),
    ("workers-in-process", SYN + ["--workers", "2", "--executor", "in-process", "--out", "done", "--overwrite"],
     "--workers sizes a Ray actor pool"),
    ("precision-unknown", SYN + ["--precision", "fp8", "--out", "done"], "'fp8' is not one of"),
    ("category-unknown", ["synthesize", "--category", "nope", "--n", "5", "--model", "pretrained", "--out", "done"],
     "unknown category 'nope'"),
    ("out-holds-a-run", SYN + ["--seed", "3", "--out", "done"], "is not empty"),
    ("out-is-a-file", SYN + ["--out", "a_file"], "a_file"),
    ("out-under-a-file", SYN + ["--out", "a_file/syn"], "a_file"),
    ("model-corrupt", SYN[:5] + ["--model", "corrupt", "--out", "done", "--overwrite"], "corrupt checkpoint model weights"),
    ("model-truncated", SYN[:5] + ["--model", "truncated", "--out", "done", "--overwrite"], "corrupt checkpoint model weights"),
    ("model-foreign", SYN[:5] + ["--model", "foreign", "--out", "done", "--overwrite"], "not an f2m-ray checkpoint"),
    ("model-other-vocabulary", SYN[:5] + ["--model", "vocab", "--out", "done", "--overwrite"], "vocabulary"),
    ("model-missing", SYN[:5] + ["--model", "nowhere", "--out", "done", "--overwrite"], "no checkpoint at nowhere"),
    ("bank-nan", SYN + ["--bank", "nan_bank.parquet", "--out", "done", "--overwrite"], "non-finite"),
    ("bank-wrong-width", SYN + ["--bank", "narrow_bank.parquet", "--out", "done", "--overwrite"],
     "the bank has 64-d features, the model expects 256-d"),
    ("bank-not-parquet", SYN + ["--bank", "images.csv", "--out", "done", "--overwrite"], "not a feature bank"),
    ("judge-corrupt", SYN + ["--judge", "judge", "--out", "done", "--overwrite"], "judge"),
    ("judge-runs-code", SYN + ["--judge", "judge_payload", "--out", "done", "--overwrite"], "judge weights"),
    ("judge-other-vocabulary", SYN + ["--judge", "judge_vocab", "--out", "done", "--overwrite"], "vocabulary"),
    ("bank-runs-code", SYN + ["--bank", "pickle_bank.parquet", "--out", "done", "--overwrite"], "not a feature bank"),
    ("bank-of-another-model", SYN + ["--bank", "other_model_bank.parquet", "--out", "done", "--overwrite"],
     "was encoded by model 0123456789abcdef"),
    ("out-not-writable", SYN + ["--out", "/sys/f2m-synthetic"], "/sys/f2m-synthetic"),
    ("s3-no-credentials", SYN + ["--out", "s3://bucket/syn"], "no S3 credentials found"),
    ("s3-unreachable", ["--with-credentials"] + SYN + ["--out", "s3://bucket/syn"], "cannot reach S3 at http://127.0.0.1:9"),
    ("train-config-unknown-key", ["train", "--config", "run.toml", "--dry-run"], "learning_rate"),
    ("train-data-empty", ["train", "--preset", "tiny", "--data", "empty.csv", "--storage", "runs"], "empty.csv"),
    ("data-check-headerless", ["data", "check", "--data", "headerless.csv"], "missing column"),
    ("data-check-wrong-columns", ["data", "check", "--data", "columns.csv"], "missing column"),
    ("data-check-no-usable-image", ["data", "check", "--data", "images.csv", "--no-sheet"], "nothing usable"),
    ("judge-train-empty", ["judge", "train", "--data", "empty.csv", "--out", "j2"], "empty.csv"),
    ("evaluate-unfinished", ["evaluate", "--synthetic", "nowhere", "--real", "phantom:50", "--out", "rep"], "nowhere"),
    ("inspect-missing", ["inspect", "nowhere"], "nowhere"),
    ("interpolate-one-seed", ["interpolate", "--model", "pretrained", "--seeds", "phantom-000001", "--out", "f.png"],
     "--seeds takes 2 roi ids"),
    ("interpolate-corrupt-model", ["interpolate", "--model", "corrupt", "--seeds", "phantom-000001,phantom-000021",
                                   "--out", "f.png"], "corrupt checkpoint model weights"),
    ("encode-corrupt-model", ["encode", "--model", "corrupt", "--data", "phantom:20", "--out", "b.parquet"],
     "corrupt checkpoint model weights"),
    ("model-info-foreign", ["model-info", "foreign"], "not an f2m-ray checkpoint"),
]


@pytest.mark.parametrize("args,cause", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_refused_in_one_clear_line(workdir, args, cause, monkeypatch):
    """The real command line, in this process (as `main()` runs it, minus the interpreter start)."""
    from click.testing import CliRunner

    from f2m_ray_cli.main import _register, cli

    before = _tree_digest(workdir / "done")
    monkeypatch.chdir(workdir)
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    if args[0] == "--with-credentials":
        args = args[1:]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    _register()
    start = time.monotonic()
    result = CliRunner().invoke(cli, args)
    assert time.monotonic() - start < 30  # answered, not waited out
    assert not (workdir / "pwned").exists()  # nothing loaded ran code
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stderr and 1 <= len(lines) <= 3, result.stderr
    assert cause in result.stderr, result.stderr
    assert _tree_digest(workdir / "done") == before


def test_the_corpus_is_large_and_reaches_every_command():
    commands = {c[1][0] for c in CASES}
    assert len(CASES) >= 30
    assert commands >= {"synthesize", "train", "data", "judge", "evaluate", "inspect", "interpolate", "encode"}
