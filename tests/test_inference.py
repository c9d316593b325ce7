"""The synthesis decoder computes what the trained decoder computes, whatever the threads or batch-mates."""

from __future__ import annotations

import pytest
import torch

from f2m_ray.checkpoint import load_generator
from f2m_ray.config import get_preset
from f2m_ray.core.images import to_uint8
from f2m_ray.core.inference import InferenceDecoder, _ConvT, _Dense, fold_batchnorm, inference_decoder
from f2m_ray.core.networks import ResizeConv2d, build_networks
from f2m_ray.pretrained import shipped_model


def _trained_like(preset: str) -> torch.nn.Module:
    """A generator whose BatchNorms hold non-trivial statistics, as after training (eval mode)."""
    torch.manual_seed(0)
    generator = build_networks(get_preset(preset).model)[0]
    for module in generator.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.3)
            module.running_var.uniform_(0.3, 3.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.2)
        elif isinstance(module, ResizeConv2d):
            torch.nn.init.kaiming_normal_(module.weight3, a=0.2)
        elif isinstance(module, torch.nn.ConvTranspose2d):
            torch.nn.init.kaiming_normal_(module.weight, a=0.2)
    return generator.eval()


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_it_equals_the_trained_decoder_in_eval_mode(preset):
    generator = _trained_like(preset)
    fast = inference_decoder(generator.decoder)
    features = torch.randn(16, generator.cfg.feature_dim) * 2
    with torch.inference_mode():
        expected, got = generator.decode(features), fast(features)
    assert got.shape == (16, 1, 64, 64)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert features.abs().max() > 0 and features.min() < 0  # the caller's features are not overwritten by LeakyReLU


def test_small_inputs_become_one_matrix_and_the_rest_channels_last_convs():
    generator = _trained_like("small")
    fast = inference_decoder(generator.decoder)
    kinds = [type(layer) for layer in fast.layers]
    assert kinds == [_Dense, _Dense, _ConvT, _ConvT, _ConvT, _ConvT, _ConvT]
    width = generator.cfg.feature_dim
    first, second = fast.layers[0].matrix.shape, fast.layers[1].matrix.shape
    c1, c2 = generator.cfg.decoder_channels[:2]
    assert first == (width, c1 * 2 * 2) and second == (c1 * 2 * 2, c2 * 4 * 4)
    assert fast.slopes == (0.2,) * 7


def test_folding_a_batchnorm_gives_the_same_affine_map():
    conv = torch.nn.ConvTranspose2d(8, 4, 4, 2, 1)
    norm = torch.nn.BatchNorm2d(4).eval()
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2.0)
    norm.weight.data.normal_()
    weight, bias = fold_batchnorm(conv, norm)
    x = torch.randn(3, 8, 5, 5)
    with torch.no_grad():
        expected = norm(conv(x))
        got = torch.nn.functional.conv_transpose2d(x, weight, bias, 2, 1)
    assert torch.allclose(got, expected, atol=1e-5)
    plain_weight, plain_bias = fold_batchnorm(conv, None)
    assert torch.equal(plain_weight, conv.weight) and torch.equal(plain_bias, conv.bias)


def test_the_shipped_models_images_are_the_same_bytes_on_one_and_two_threads_and_in_any_batch_slot():
    generator, _ = load_generator(shipped_model())
    fast = inference_decoder(generator.decoder)
    assert isinstance(fast, InferenceDecoder) and not fast.training
    torch.manual_seed(1)
    features = torch.randn(64, generator.cfg.feature_dim) * 3
    previous = torch.get_num_threads()
    try:
        images = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                images[threads] = fast(features)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(images[1], images[2])
    with torch.inference_mode():
        moved = fast(torch.cat([features[5:6], features[:5], features[6:]]))
        trained = generator.decode(features)
    assert torch.equal(moved[0], images[1][5])
    as_stored, trained_bytes = to_uint8(images[1].numpy()[:, 0]), to_uint8(trained.numpy()[:, 0])
    assert (as_stored != trained_bytes).mean() < 1e-3  # float rounding may move a rare pixel by one grey level
    assert abs(as_stored.astype(int) - trained_bytes.astype(int)).max() <= 1


def test_a_resize_decoder_folds_into_the_same_fast_layers():
    from dataclasses import replace

    from f2m_ray.core.networks import Generator, _init_weights

    torch.manual_seed(0)
    cfg = replace(get_preset("tiny").model, upsample="resize")
    generator = Generator(cfg)
    generator.apply(_init_weights)
    for module in generator.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.3)
            module.running_var.uniform_(0.3, 3.0)
    generator.eval()
    fast = inference_decoder(generator.decoder)
    assert [type(layer) for layer in fast.layers] == [_Dense, _Dense, _ConvT, _ConvT, _ConvT, _ConvT, _ConvT]
    features = torch.randn(8, cfg.feature_dim) * 2
    with torch.inference_mode():
        expected, got = generator.decode(features), fast(features)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
