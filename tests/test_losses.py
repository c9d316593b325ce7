import pytest
import numpy as np
import torch

from f2m_ray.config import PRESETS
from f2m_ray.core.losses import DiscriminatorOutputs, discriminator_loss, generator_loss
from f2m_ray.core.networks import build_networks


def _toy(b=8, seed=0):
    """Bright discs of random centre and radius on a dark background, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centre = 20 + 24 * torch.rand(b, 2, generator=g)
    radius = 6 + 10 * torch.rand(b, generator=g)
    dist = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    images = (torch.sigmoid(radius[:, None, None] - dist) * 1.6 - 0.8)[:, None]  # (B, 1, 64, 64)
    margins = torch.randint(0, 5, (b,), generator=g)
    shapes = torch.randint(0, 5, (b,), generator=g)
    return images, margins, shapes


def _step_losses(nets, images, margins, shapes, loss_cfg):
    g, d1, d2 = nets
    fake = g(images, margins, shapes)
    outs = []
    for d, labels, w in ((d1, margins, loss_cfg.lambda_margin), (d2, shapes, loss_cfg.lambda_shape)):
        rl, rc = d(images)
        fl, fc = d(fake.detach())
        outs.append(discriminator_loss(DiscriminatorOutputs(rl, rc, fl, fc), labels, w))
    m_rf, m_lab = d1(fake)
    s_rf, s_lab = d2(fake)
    gl = generator_loss(m_rf, m_lab, s_rf, s_lab, margins, shapes, images, fake, loss_cfg)
    return outs, gl


def test_losses_finite_and_positive():
    preset = PRESETS["tiny"]
    nets = build_networks(preset.model)
    (d1_loss, d2_loss), g_loss = _step_losses(nets, *_toy(), preset.loss)
    for parts in (d1_loss, d2_loss, g_loss):
        for name, value in parts.items():
            assert torch.isfinite(value), name
            assert value.item() > 0, name  # BCE, CE and L1 are all > 0 on a random net
    # The total is the weighted sum of its parts.
    expected = g_loss["adversarial"] + 10 * g_loss["labels"] + 300 * g_loss["l1"]
    torch.testing.assert_close(g_loss["total"], expected)


def test_perfect_discriminator_has_low_loss():
    labels = torch.tensor([0, 1, 2])
    confident = torch.full((3, 5), -20.0)
    confident[torch.arange(3), labels] = 20.0
    good = DiscriminatorOutputs(torch.full((3,), 20.0), confident, torch.full((3,), -20.0), confident)
    bad = DiscriminatorOutputs(torch.full((3,), -20.0), -confident, torch.full((3,), 20.0), -confident)
    assert discriminator_loss(good, labels, 10.0)["total"].item() < 1e-6
    assert discriminator_loss(bad, labels, 10.0)["total"].item() > 100


def test_few_tiny_steps_lower_l1():
    torch.manual_seed(0)
    preset = PRESETS["tiny"]
    nets = build_networks(preset.model)
    g, d1, d2 = nets
    images, margins, shapes = _toy(16)
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-3)
    opt_d = torch.optim.Adam(list(d1.parameters()) + list(d2.parameters()), lr=2e-4)
    l1_values = []
    for _ in range(30):
        (dl1, dl2), gl = _step_losses(nets, images, margins, shapes, preset.loss)
        opt_d.zero_grad()
        (dl1["total"] + dl2["total"]).backward()
        opt_d.step()
        _, gl = _step_losses(nets, images, margins, shapes, preset.loss)
        opt_g.zero_grad()
        gl["total"].backward()
        opt_g.step()
        l1_values.append(gl["l1"].item())
    assert sum(l1_values[-5:]) / 5 < 0.7 * sum(l1_values[:5]) / 5


def test_fake_label_weight_scales_only_the_label_term_on_fakes():
    labels = torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(1)
    out = DiscriminatorOutputs(torch.randn(4, generator=g), torch.randn(4, 5, generator=g),
                               torch.randn(4, generator=g), torch.randn(4, 5, generator=g))
    full = discriminator_loss(out, labels, 10.0)
    tenth = discriminator_loss(out, labels, 10.0, fake_label_weight=0.1)
    none = discriminator_loss(out, labels, 10.0, fake_label_weight=0.0)
    torch.testing.assert_close(full["total"], full["adversarial"] + 10 * (full["label_real"] + full["label_fake"]))
    torch.testing.assert_close(tenth["total"], full["adversarial"] + 10 * (full["label_real"] + 0.1 * full["label_fake"]))
    torch.testing.assert_close(none["total"], full["adversarial"] + 10 * full["label_real"])
    assert PRESETS["paper"].loss.fake_label_weight == 1.0 and PRESETS["small"].loss.fake_label_weight == 0.1


def test_d_augment_changes_what_d_sees_only_when_set():
    """Feature2MassStep shows D augmented images iff d_augment; the same generator seed repeats a step."""
    from f2m_ray.core.step import Feature2MassStep, make_optimizers

    preset = PRESETS["tiny"]
    images, margins, shapes = _toy(8)

    def one_step(d_augment: bool, seed: int):
        torch.manual_seed(0)
        g, d1, d2 = build_networks(preset.model)
        seen = []
        d1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        opt_g, opt_d = make_optimizers(g, d1, d2, preset.train)
        step = Feature2MassStep(g, d1, d2, opt_g, opt_d, preset.loss, d_augment=d_augment,
                                augment_generator=torch.Generator().manual_seed(seed))
        return step(images, margins, shapes), seen

    plain, seen_plain = one_step(False, 0)
    assert torch.equal(seen_plain[0], images)  # D1's first input: the real batch as it is
    augmented, seen_aug = one_step(True, 0)
    assert len(seen_aug) == 3 and not torch.equal(seen_aug[0], images)
    repeat, _ = one_step(True, 0)
    other, _ = one_step(True, 1)
    assert all(torch.equal(augmented[k], repeat[k]) for k in augmented)
    assert augmented["d_margin_loss"] != other["d_margin_loss"]
    assert PRESETS["paper"].train.d_augment is False


def test_torch_variance_preserving_mix_matches_the_synthesis_mix():
    from f2m_ray.core.mixing import mix_rows
    from f2m_ray.core.networks import variance_preserving_mix

    g = torch.Generator().manual_seed(0)
    features = torch.randn(6, 16, generator=g, dtype=torch.float64)
    centroid = torch.randn(16, generator=g, dtype=torch.float64)
    weights = torch.tensor([[0.5, 0.25, 0.25, 0, 0, 0], [0, 0, 0, 0, 1.0, 0]], dtype=torch.float64)
    got = variance_preserving_mix(features, weights, centroid.expand(6, 16))
    want = mix_rows(features.numpy()[None].repeat(2, 0), weights.numpy(), centroid.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), features[4].numpy())  # one-hot: the member itself


def test_mix_training_shows_d_decoded_mixes_of_one_category():
    """lambda_mix > 0: from the second step on (centroids known) D and G also see mixes, labelled."""
    from dataclasses import replace

    from f2m_ray.core.step import MIX_METRICS, STEP_METRICS, Feature2MassStep, make_optimizers

    preset = PRESETS["tiny"]
    images, _, _ = _toy(8)
    margins = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])  # categories with partners: rows 0-4, 6, 7
    shapes = torch.tensor([1, 1, 1, 2, 2, 0, 4, 4])

    def run(lambda_mix: float):
        torch.manual_seed(0)
        g, d1, d2 = build_networks(preset.model)
        seen = []
        d1.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
        opt_g, opt_d = make_optimizers(g, d1, d2, preset.train)
        step = Feature2MassStep(g, d1, d2, opt_g, opt_d, replace(preset.loss, lambda_mix=lambda_mix),
                                mix_generator=torch.Generator().manual_seed(0))
        first = step(images, margins, shapes)
        after_first = [p.detach().clone() for p in g.parameters()]
        second = step(images, margins, shapes)
        return step, first, second, after_first, [p.detach().clone() for p in g.parameters()], seen

    plain = run(0.0)
    mixed = run(1.0)
    assert plain[0].metric_names == STEP_METRICS and mixed[0].metric_names == STEP_METRICS + MIX_METRICS
    assert set(plain[2]) == set(STEP_METRICS) and set(mixed[2]) == set(STEP_METRICS + MIX_METRICS)
    # step 1 has no centroids yet: no mix, the same update as without the option
    assert all(torch.equal(a, b) for a, b in zip(plain[3], mixed[3]))
    assert mixed[1]["g_mix_adversarial"] == 0
    # step 2: D1 sees real 8, fake 8, then the 7 mixes (rows with a partner), in D's and G's phase
    assert mixed[5][3:] == [8, 8, 7, 8, 7] and plain[5][3:] == [8, 8, 8]
    assert mixed[2]["g_mix_adversarial"] > 0 and mixed[2]["g_mix_labels"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(plain[4], mixed[4]))


def test_generator_adversarial_target_is_real():
    """G's adversarial term is low where D says "real" (logit >> 0) and high where it says "fake"."""
    from f2m_ray.config import LossConfig

    labels = torch.zeros(4, 5)
    ids = torch.zeros(4, dtype=torch.int64)
    image = torch.zeros(4, 1, 8, 8)

    def adversarial(logit: float) -> float:
        out = generator_loss(torch.full((4,), logit), labels, torch.full((4,), logit), labels, ids, ids, image, image,
                             LossConfig())
        return float(out["adversarial"])

    assert adversarial(8.0) < 0.01 and adversarial(-8.0) > 15.0


def test_generator_learns_through_the_discriminators_alone():
    """With the L1 and label weights at 0, G's only gradient is D's verdict on its fakes: it must reach G."""
    from dataclasses import replace

    from f2m_ray.core.step import Feature2MassStep, make_optimizers

    preset = PRESETS["tiny"]
    images, margins, shapes = _toy(8)
    torch.manual_seed(0)
    g, d1, d2 = build_networks(preset.model)
    opt_g, opt_d = make_optimizers(g, d1, d2, preset.train)
    loss = replace(preset.loss, lambda_l1=0.0, lambda_generator_labels=0.0)
    before = [p.detach().clone() for p in g.decoder.parameters()]
    Feature2MassStep(g, d1, d2, opt_g, opt_d, loss)(images, margins, shapes)
    grads = [p.grad for p in g.decoder.parameters()]
    assert all(grad is not None for grad in grads) and sum(float(grad.abs().sum()) for grad in grads) > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, g.decoder.parameters()))


def test_each_discriminator_is_scored_on_its_own_labels():
    """D1's label terms use the margins and D2's the shapes: the step's D losses equal eq. 3 and 4 with them,
    and differ from the same terms on each other's labels."""
    from f2m_ray.core.step import Feature2MassStep, make_optimizers

    preset = PRESETS["tiny"]
    images, margins, shapes = _toy(8, seed=3)
    assert not torch.equal(margins, shapes)
    torch.manual_seed(0)
    g, d1, d2 = build_networks(preset.model)
    opt_g, opt_d = make_optimizers(g, d1, d2, preset.train)
    loss = preset.loss
    with torch.no_grad():  # what the step will see: train-mode BatchNorm uses this batch's own statistics
        fake = g(images, margins, shapes)
        outputs = {name: DiscriminatorOutputs(*d(images), *d(fake)) for name, d in (("margin", d1), ("shape", d2))}

    def eq(name: str, labels: torch.Tensor) -> float:
        weight = loss.lambda_margin if name == "margin" else loss.lambda_shape
        return float(discriminator_loss(outputs[name], labels, weight, loss.fake_label_weight)["total"])

    metrics = Feature2MassStep(g, d1, d2, opt_g, opt_d, loss)(images, margins, shapes)
    assert abs(float(metrics["d_margin_loss"]) - eq("margin", margins)) < 1e-4
    assert abs(float(metrics["d_shape_loss"]) - eq("shape", shapes)) < 1e-4
    assert abs(eq("margin", margins) - eq("margin", shapes)) > 0.1 and abs(eq("shape", shapes) - eq("shape", margins)) > 0.1


def test_the_discriminators_label_term_rewards_the_true_label():
    """CE on the given labels: logits confident in the true class cost little, confident in another class a lot."""
    labels = torch.tensor([0, 3, 1, 4])
    right, wrong = torch.full((4, 5), -6.0), torch.full((4, 5), -6.0)
    right[torch.arange(4), labels] = 6.0
    wrong[torch.arange(4), (labels + 1) % 5] = 6.0
    zero = torch.zeros(4)
    terms = {name: discriminator_loss(DiscriminatorOutputs(zero, logits, zero, logits), labels, 1.0)
             for name, logits in (("right", right), ("wrong", wrong))}
    assert terms["right"]["label_real"] < 0.01 and terms["right"]["label_fake"] < 0.01
    assert terms["wrong"]["label_real"] > 10 and terms["wrong"]["label_fake"] > 10


def test_the_template_levers_are_off_by_default_and_each_adds_its_term():
    from dataclasses import replace

    from f2m_ray.core.losses import feature_matching, gradient_l1

    preset = PRESETS["tiny"]
    assert (preset.loss.lambda_adversarial, preset.loss.lambda_gradient, preset.loss.lambda_feature_matching) == (1, 0, 0)
    images, margins, shapes = _toy()
    shifted = images + 0.3  # the same edges, another level
    assert gradient_l1(shifted, images).item() < 1e-6 < gradient_l1(images.flip(-1), images).item()
    maps = [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 2, 2)]
    assert feature_matching(maps, maps).item() == 0.0
    expected = (torch.nn.functional.l1_loss(maps[0], 0 * maps[0]) + torch.nn.functional.l1_loss(maps[1], 0 * maps[1])) / 2
    torch.testing.assert_close(feature_matching(maps, [0 * m for m in maps]), expected)
    nets = build_networks(preset.model)
    base = replace(preset.loss, lambda_generator_labels=0.0)
    levered = replace(base, lambda_adversarial=0.25, lambda_gradient=7.0)
    torch.manual_seed(0)
    _, plain = _step_losses(nets, images, margins, shapes, base)
    torch.manual_seed(0)
    _, pulled = _step_losses(nets, images, margins, shapes, levered)
    fake = nets[0](images, margins, shapes)
    expected = 0.25 * pulled["adversarial"] + 300 * pulled["l1"] + 7.0 * gradient_l1(fake, images)
    torch.testing.assert_close(pulled["total"], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain["total"], plain["adversarial"] + 300 * plain["l1"], rtol=1e-4, atol=1e-4)


def test_feature_matching_pays_g_for_looking_like_its_input_to_d():
    from dataclasses import replace

    from f2m_ray.core.losses import feature_matching
    from f2m_ray.core.step import Feature2MassStep, make_optimizers

    preset = PRESETS["tiny"]
    images, margins, shapes = _toy()
    totals, matched = [], None
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        g, d1, d2 = build_networks(preset.model)
        opt_g, opt_d = make_optimizers(g, d1, d2, preset.train)
        step = Feature2MassStep(g, d1, d2, opt_g, opt_d, replace(preset.loss, lambda_feature_matching=weight))
        if weight:  # what the term is worth right after D's update, which is when G's phase reads it
            original = opt_d.step

            def d_step_then_measure():
                nonlocal matched
                original()
                with torch.no_grad():
                    fake = g(images, margins, shapes)
                    matched = sum(feature_matching(d(fake, features=True)[2], d(images, features=True)[2])
                                  for d in (d1, d2)) / 2

            opt_d.step = d_step_then_measure
        totals.append(step(images, margins, shapes)["g_loss"].item())
    assert matched > 0
    assert totals[1] - totals[0] == pytest.approx(5.0 * float(matched), rel=0.05)


def test_freezing_d_in_g_phase_changes_no_update_and_restores_its_gradients(monkeypatch):
    import contextlib

    from f2m_ray.core import step as step_module

    def one_step():
        """A step from a fixed start; whether G's phase added to D's weight gradients (D's own phase set them)."""
        torch.manual_seed(0)
        nets = build_networks(PRESETS["tiny"].model)
        opt_g, opt_d = step_module.make_optimizers(*nets, PRESETS["tiny"].train)
        after_d = {}
        touched = []
        d_step, g_step = opt_d.step, opt_g.step

        def d_step_then_remember():
            d_step()
            after_d.update({n: p.grad.clone() for n, p in nets[1].named_parameters()})

        def g_step_then_compare():
            touched.append(any(not torch.equal(p.grad, after_d[n]) for n, p in nets[1].named_parameters()))
            g_step()

        opt_d.step, opt_g.step = d_step_then_remember, g_step_then_compare
        step_module.Feature2MassStep(*nets, opt_g, opt_d, PRESETS["tiny"].loss)(*_toy())
        return nets, touched[0]

    frozen, frozen_touched = one_step()
    assert all(p.requires_grad for net in frozen for p in net.parameters())  # restored after G's phase
    assert not frozen_touched  # G's backward computed no weight gradient of D
    monkeypatch.setattr(step_module, "_frozen", lambda module: contextlib.nullcontext())
    plain, plain_touched = one_step()
    assert plain_touched
    for a, b in zip(frozen, plain):  # the same update of G, D1 and D2 either way
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, msg=name)
