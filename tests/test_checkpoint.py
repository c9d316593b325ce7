import json
import os

import pytest
import torch

from f2m_ray import checkpoint
from f2m_ray.config import PRESETS
from f2m_ray.errors import F2MError
from f2m_ray.core.networks import build_networks


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    preset = PRESETS["tiny"]
    nets = build_networks(preset.model)
    opt = torch.optim.Adam(nets[0].parameters(), lr=1e-3)
    nets[0](torch.zeros(2, 1, 64, 64), torch.tensor([0, 1]), torch.tensor([1, 2])).mean().backward()
    opt.step()
    run = tmp_path / "run"
    for epoch in (1, 3, 2):
        checkpoint.save_checkpoint(str(run / f"checkpoint_{epoch:06d}"), preset, *nets, epoch=epoch, step=10 * epoch,
                                   optimizers={"generator": opt})
    return run, nets


def test_round_trip(saved):
    run, (g, _, _) = saved
    ckpt = checkpoint.load_checkpoint(str(run / "checkpoint_000002"), with_optimizer=True)
    assert (ckpt.epoch, ckpt.step, ckpt.preset.name) == (2, 20, "tiny")
    assert ckpt.optim_state["generator"]["state"]  # Adam moments were saved
    loaded = ckpt.generator()
    v = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(v), g.eval().decode(v))
    assert ckpt.model_id == checkpoint.model_id(g.state_dict()) and len(ckpt.model_id) == 16


def test_generator_only_loading_matches_the_full_checkpoint(saved):
    run, _ = saved
    full = checkpoint.load_checkpoint(str(run)).generator()
    generator, meta = checkpoint.load_generator(str(run))
    assert meta["epoch"] == 3 and meta["model_id"] == checkpoint.model_id(generator.state_dict())
    assert not generator.training and not any(p.is_meta for p in generator.parameters())
    assert generator.state_dict().keys() == full.state_dict().keys()
    for name, tensor in full.state_dict().items():
        torch.testing.assert_close(generator.state_dict()[name], tensor, rtol=0, atol=0)
    v = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(generator.decode(v), full.decode(v), rtol=0, atol=0)


def test_run_folder_resolves_to_latest(saved):
    run, _ = saved
    assert checkpoint.find_checkpoint(str(run)).endswith("checkpoint_000003")
    assert checkpoint.load_checkpoint(str(run)).epoch == 3


def test_weights_are_plain_tensors(saved):
    run, _ = saved
    state = torch.load(run / "checkpoint_000001" / "model.pt", weights_only=True)
    assert set(state) == {"generator", "d_margin", "d_shape"}
    meta = json.loads((run / "checkpoint_000001" / "f2m_checkpoint.json").read_text())
    assert meta["vocabulary"]["margins"][4] == "spiculated"


def _meta_path(run):
    return run / "checkpoint_000001" / "f2m_checkpoint.json"


def test_foreign_vocabulary_refused(saved):
    run, _ = saved
    meta = json.loads(_meta_path(run).read_text())
    meta["vocabulary"]["shapes"] = ["round", "oval"]
    _meta_path(run).write_text(json.dumps(meta))
    with pytest.raises(F2MError, match="another BI-RADS vocabulary"):
        checkpoint.load_checkpoint(str(run / "checkpoint_000001"))


def test_other_format_version_refused(saved):
    run, _ = saved
    meta = json.loads(_meta_path(run).read_text())
    meta["format_version"] = 99
    _meta_path(run).write_text(json.dumps(meta))
    with pytest.raises(F2MError, match="format version 99"):
        checkpoint.load_checkpoint(str(run / "checkpoint_000001"))


def test_corrupt_files_refused(saved, tmp_path):
    run, _ = saved
    weights = run / "checkpoint_000002" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(F2MError, match="corrupt checkpoint model weights"):
        checkpoint.load_checkpoint(str(run / "checkpoint_000002"))
    with pytest.raises(F2MError, match="corrupt checkpoint model weights"):
        checkpoint.load_generator(str(run / "checkpoint_000002"))
    (run / "checkpoint_000003" / "f2m_checkpoint.json").write_text("{not json")
    with pytest.raises(F2MError, match="not valid JSON"):
        checkpoint.load_checkpoint(str(run / "checkpoint_000003"))
    empty = tmp_path / "empty"
    os.mkdir(empty)
    with pytest.raises(F2MError, match="not an f2m-ray checkpoint"):
        checkpoint.load_checkpoint(str(empty))
    with pytest.raises(F2MError, match="does not exist"):
        checkpoint.load_checkpoint(str(tmp_path / "missing"))


def test_pickled_object_is_not_executed(saved, tmp_path):
    run, _ = saved

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"generator": Evil(), "d_margin": {}, "d_shape": {}}, run / "checkpoint_000001" / "model.pt")
    with pytest.raises(F2MError, match="corrupt checkpoint"):
        checkpoint.load_checkpoint(str(run / "checkpoint_000001"))
    with pytest.raises(F2MError, match="corrupt checkpoint"):
        checkpoint.load_generator(str(run / "checkpoint_000001"))
    assert not (tmp_path / "pwned").exists()


def test_a_float16_export_decodes_within_a_grey_level_and_names_itself(saved, tmp_path):
    import numpy as np

    from f2m_ray.core.images import to_uint8

    run, _ = saved
    source = str(run / "checkpoint_000003")
    out = checkpoint.export_generator(source, str(tmp_path / "export"), "float16", note={"recipe": "r"})
    stored = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert set(stored) == {"generator"}
    assert {t.dtype for t in stored["generator"].values() if t.is_floating_point()} == {torch.float16}
    full = os.path.getsize(os.path.join(source, "model.pt"))
    assert os.path.getsize(os.path.join(out, "model.pt")) < 0.5 * full  # no discriminators, half-width weights
    exported, meta = checkpoint.load_generator(out)
    original, source_meta = checkpoint.load_generator(source)
    assert next(exported.parameters()).dtype == torch.float32
    assert meta["export"] == {"from_model_id": source_meta["model_id"], "weights_dtype": "float16",
                              "contents": "generator", "recipe": "r"}
    assert meta["model_id"] == checkpoint.model_id(exported.state_dict()) != source_meta["model_id"]
    v = torch.randn(16, 64)
    with torch.no_grad():
        a, b = (to_uint8(g.decode(v).numpy()).astype(np.int16) for g in (original, exported))
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.05
    with pytest.raises(F2MError, match="synthesis-only export .* cannot resume from it"):
        checkpoint.load_checkpoint(out)
    with pytest.raises(F2MError, match="export dtype must be"):
        checkpoint.export_generator(source, str(tmp_path / "bad"), "int8")


def test_a_weight_average_is_what_loads_for_synthesis_and_the_live_weights_resume(tmp_path):
    from dataclasses import replace

    from f2m_ray.core.step import WeightAverage

    torch.manual_seed(0)
    preset = replace(PRESETS["tiny"], train=replace(PRESETS["tiny"].train, ema_kimg=0.064))
    g, d1, d2 = build_networks(preset.model)
    average = WeightAverage(g, half_life_images=64, images_per_step=32)
    assert average.beta == pytest.approx(0.5 ** 0.5)
    before = [p.detach().clone() for p in average.module.parameters()]
    steps = [0.05 * torch.randn_like(p) for p in g.parameters()]
    with torch.no_grad():
        for p, delta in zip(g.parameters(), steps):
            p.add_(delta)  # a training step
    average.update(g)
    for a, b, delta in zip(average.module.parameters(), before, steps):
        torch.testing.assert_close(a, b + (1 - 0.5 ** 0.5) * delta)  # lerp towards the live weights by 1 - beta
    assert not any(p.requires_grad for p in average.module.parameters())

    path = str(tmp_path / "ck")
    checkpoint.save_checkpoint(path, preset, g, d1, d2, epoch=1, step=1, generator_average=average.module)
    loaded, meta = checkpoint.load_generator(path)
    v = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(v), average.module.eval().decode(v))
        assert not torch.allclose(loaded.decode(v), g.eval().decode(v))
    assert meta["model_id"] == checkpoint.model_id(average.module.state_dict()) != checkpoint.model_id(g.state_dict())
    full = checkpoint.load_checkpoint(path)
    assert set(full.model_state) == {"generator", "generator_ema", "d_margin", "d_shape"}
    resumed = full.networks()[0]  # training resumes from the live weights
    for a, b in zip(resumed.parameters(), g.parameters()):
        torch.testing.assert_close(a, b)
    export = checkpoint.export_generator(path, str(tmp_path / "export"), dtype="float32")
    exported, _ = checkpoint.load_generator(export)
    with torch.no_grad():
        torch.testing.assert_close(exported.decode(v), average.module.decode(v))
