import pytest
import torch

from f2m_ray.config import PRESETS
from f2m_ray.core.networks import Discriminator, Generator, build_networks, count_parameters


def _batch(b=4):
    torch.manual_seed(0)
    return torch.rand(b, 1, 64, 64) * 2 - 1, torch.tensor([0, 1, 2, 4][:b]), torch.tensor([4, 3, 0, 1][:b])


@pytest.mark.parametrize("name, feature_dim", [("paper", 1024), ("small", 256), ("tiny", 64)])
def test_shapes(name, feature_dim):
    cfg = PRESETS[name].model
    g, d1, d2 = build_networks(cfg)
    images, margins, shapes = _batch()
    v = g.encode(images, margins, shapes)
    assert v.shape == (4, feature_dim)  # (B, D)
    out = g.decode(v)
    assert out.shape == (4, 1, 64, 64)
    assert out.min() >= -1 and out.max() <= 1  # tanh
    rf, logits = d1(out)
    assert rf.shape == (4,) and logits.shape == (4, cfg.n_margins)
    rf, logits = d2(out)
    assert logits.shape == (4, cfg.n_shapes)


def test_paper_layer_and_parameter_counts():
    cfg = PRESETS["paper"].model
    g, d1, _ = build_networks(cfg)
    convs = [m for m in g.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    tconvs = [m for m in g.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    dconvs = [m for m in d1.modules() if isinstance(m, torch.nn.Conv2d)]
    dfcs = [m for m in d1.modules() if isinstance(m, torch.nn.Linear)]
    efcs = [m for m in g.embed_margin.modules() if isinstance(m, torch.nn.Linear)]
    assert (len(convs), len(tconvs), len(dconvs), len(dfcs)) == (7, 7, 10, 3)
    assert [f.out_features for f in efcs] == [256, 4096]
    # Counted by hand from the widths in ModelConfig (weights + biases + BatchNorm affine).
    assert count_parameters(g) == 32_889_729
    assert count_parameters(g.decoder) == 15_372_993
    assert count_parameters(d1) == 12_482_822


def test_encode_decode_compose_to_forward():
    g = Generator(PRESETS["tiny"].model).eval()
    images, margins, shapes = _batch()
    with torch.no_grad():
        assert torch.equal(g(images, margins, shapes), g.decode(g.encode(images, margins, shapes)))


def test_feature_depends_on_labels():
    g = Generator(PRESETS["tiny"].model).eval()
    images, margins, shapes = _batch(2)
    with torch.no_grad():
        a = g.encode(images, margins, shapes)
        b = g.encode(images, margins, (shapes + 1) % 5)
    assert not torch.allclose(a, b)


def test_eval_feature_independent_of_batch():
    g = Generator(PRESETS["tiny"].model).eval()
    images, margins, shapes = _batch(4)
    with torch.no_grad():
        full = g.encode(images, margins, shapes)
        one = g.encode(images[:1], margins[:1], shapes[:1])
    torch.testing.assert_close(full[:1], one, rtol=1e-5, atol=1e-6)


def test_discriminator_counts_classes():
    d = Discriminator(PRESETS["tiny"].model, 7)
    _, logits = d(torch.zeros(2, 1, 64, 64))
    assert logits.shape == (2, 7)


def test_resize_conv_is_nearest_upsampling_then_a_3x3_conv():
    from f2m_ray.core.networks import ResizeConv2d

    torch.manual_seed(1)
    layer = ResizeConv2d(5, 7)
    torch.nn.init.normal_(layer.weight3)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 5, 8, 8)
    upsampled = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")  # (3, 5, 16, 16)
    expected = torch.nn.functional.conv2d(upsampled, layer.weight3, layer.bias, padding=1)
    got = layer(x)
    assert got.shape == (3, 7, 16, 16)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert sorted(name for name, _ in layer.named_parameters()) == ["bias", "weight3"]
    assert sorted(layer.state_dict()) == ["bias", "weight3"]  # the 4x4 kernel is derived, never stored
    # no checkerboard: a constant input gives a constant output away from the border
    flat = layer(torch.ones(1, 5, 8, 8))[0, :, 2:-2, 2:-2]
    assert torch.allclose(flat, flat[:, :1, :1].expand_as(flat), atol=1e-5)


def test_a_resize_decoder_trains_and_reloads_through_load_generator(tmp_path):
    from dataclasses import replace

    from f2m_ray.checkpoint import load_generator, save_checkpoint

    cfg = replace(PRESETS["tiny"].model, upsample="resize")
    g, d1, d2 = build_networks(cfg)
    kinds = {type(m).__name__ for m in g.decoder.modules()}
    assert "ResizeConv2d" in kinds and "ConvTranspose2d" in kinds  # six resize layers, the stride-1 output
    images, margins, shapes = _batch()
    g(images, margins, shapes).mean().backward()
    assert all(p.grad is not None for p in g.decoder.parameters())
    preset = replace(PRESETS["tiny"], model=cfg)
    save_checkpoint(str(tmp_path / "ck"), preset, g, d1, d2, epoch=1, step=1)
    loaded, meta = load_generator(str(tmp_path / "ck"))
    assert meta["preset"]["model"]["upsample"] == "resize"
    g.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, margins, shapes), g(images, margins, shapes))


def test_discriminator_features_are_its_conv_stages():
    d = build_networks(PRESETS["tiny"].model)[1]
    images = _batch()[0]
    logit, labels, maps = d(images, features=True)
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4, 2]
    torch.testing.assert_close((logit, labels), d(images))
