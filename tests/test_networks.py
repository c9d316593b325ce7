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
