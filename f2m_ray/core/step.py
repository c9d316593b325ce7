"""One optimisation step of Feature2Mass (eq. 3-5, plus the optional mix terms), pure PyTorch.

Used by the Ray Train workers (f2m_ray.train.driver) and by the single-process benchmark loops, so both
do exactly the same work per step. No Ray, no I/O.
"""

from __future__ import annotations

import contextlib
import copy
from itertools import chain

import torch

from f2m_ray.core.augment import diff_augment
from f2m_ray.config import LossConfig, TrainConfig
from f2m_ray.labels import MARGINS, SHAPES
from f2m_ray.core.losses import (
    DiscriminatorOutputs,
    discriminator_loss,
    feature_matching,
    generator_loss,
    mix_discriminator_loss,
    mix_generator_loss,
)


class Feature2MassStep:
    """One optimisation step of D1, D2 then G (eq. 3-5) on a batch; DDP-wrapped or plain modules.

    Used by the Ray Train workers and by the single-process benchmark loop, so both do
    exactly the same work per step.
    """

    def __init__(
        self,
        generator: torch.nn.Module,
        d_margin: torch.nn.Module,
        d_shape: torch.nn.Module,
        optimizer_g: torch.optim.Optimizer,
        optimizer_d: torch.optim.Optimizer,
        loss: LossConfig,
        autocast_bf16: bool = False,
        d_augment: bool = False,
        augment_generator: torch.Generator | None = None,
        mix_generator: torch.Generator | None = None,
        average: WeightAverage | None = None,
    ):
        self.generator, self.d_margin, self.d_shape = generator, d_margin, d_shape
        self.optimizer_g, self.optimizer_d = optimizer_g, optimizer_d
        self.loss = loss
        self.autocast_bf16 = autocast_bf16
        self.d_augment = d_augment  # TrainConfig.d_augment: every image D1/D2 see goes through diff_augment
        self.augment_generator = augment_generator
        self.average = average  # G's weight average (TrainConfig.ema_kimg), updated after each G step
        self.mix_generator = mix_generator or torch.Generator()  # CPU: the mixing weights
        self.centroids: torch.Tensor | None = None  # (categories, D) running mean feature per category
        self.centroid_seen: torch.Tensor | None = None  # (categories,) bool

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The loss terms __call__ returns, in a fixed order."""
        return STEP_METRICS + (MIX_METRICS if self.loss.lambda_mix > 0 else ())

    def _mix_plan(self, categories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows (M,), weights (M, B)) for (B,) category ids: a Dirichlet(1) mix of same-category batch
        members for each member with a partner in the batch and a category centroid already; None when none."""
        if self.centroids is None:
            return None
        same = (categories[:, None] == categories[None, :]).cpu()  # (B, B)
        usable = (same.sum(dim=1) > 1) & self.centroid_seen[categories].cpu()
        rows = torch.nonzero(usable).squeeze(1)
        if len(rows) == 0:
            return None
        draws = -torch.log(torch.rand(len(rows), len(categories), generator=self.mix_generator).clamp_min(1e-12))
        draws = draws * same[rows]  # exponentials on the row's category, normalised: Dirichlet(1)
        weights = draws / draws.sum(dim=1, keepdim=True)
        return rows.to(categories.device), weights.to(categories.device)

    def _update_centroids(self, features: torch.Tensor, categories: torch.Tensor) -> None:
        """Running mean feature per category (momentum 0.9) from this batch's detached features."""
        n = len(MARGINS) * len(SHAPES)
        v = features.detach().float()
        if self.centroids is None:
            self.centroids = torch.zeros(n, v.shape[1], device=v.device)
            self.centroid_seen = torch.zeros(n, dtype=torch.bool, device=v.device)
        sums = torch.zeros_like(self.centroids).index_add_(0, categories, v)
        counts = torch.zeros(n, device=v.device).index_add_(0, categories, torch.ones_like(categories, dtype=v.dtype))
        present = counts > 0
        means = sums[present] / counts[present, None]
        old = self.centroids[present]
        seen = self.centroid_seen[present, None]
        self.centroids[present] = torch.where(seen, 0.9 * old + 0.1 * means, means)
        self.centroid_seen |= present

    def _seen(self, images: torch.Tensor) -> torch.Tensor:
        """What a discriminator is shown: the images, or a fresh differentiable augmentation of them."""
        return diff_augment(images, self.augment_generator) if self.d_augment else images

    def _autocast(self):
        if self.autocast_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, images: torch.Tensor, margins: torch.Tensor, shapes: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 1, H, W) in [-1, 1], margins/shapes (B,) -> detached loss terms."""
        mixing = self.loss.lambda_mix > 0
        categories = margins * len(SHAPES) + shapes  # Category.id of each member
        plan = self._mix_plan(categories) if mixing else None
        with self._autocast():
            if not mixing:
                fake = self.generator(images, margins, shapes)  # (B, 1, H, W)
            else:  # reconstructions, mixes (M, 1, H, W) and the batch's features in one pass
                weights = plan[1] if plan is not None else torch.zeros(0, len(images), device=images.device)
                centroids = self.centroids[categories] if plan is not None else 0.0
                fake, fake_mix, features = self.generator(images, margins, shapes, mix=(weights, centroids))
                self._update_centroids(features, categories)

            # D: real -> 1, fake -> 0, true labels on both (eq. 3, 4)
            real_m, real_m_labels = self.d_margin(self._seen(images))
            fake_m, fake_m_labels = self.d_margin(self._seen(fake.detach()))
            real_s, real_s_labels = self.d_shape(self._seen(images))
            fake_s, fake_s_labels = self.d_shape(self._seen(fake.detach()))
        fake_weight = self.loss.fake_label_weight
        loss_m = discriminator_loss(
            DiscriminatorOutputs(real_m, real_m_labels, fake_m, fake_m_labels), margins, self.loss.lambda_margin, fake_weight
        )
        loss_s = discriminator_loss(
            DiscriminatorOutputs(real_s, real_s_labels, fake_s, fake_s_labels), shapes, self.loss.lambda_shape, fake_weight
        )
        loss_d = loss_m["total"] + loss_s["total"]
        if plan is not None:  # decoded mixes are fakes with their category's labels
            mix_margins, mix_shapes = margins[plan[0]], shapes[plan[0]]
            with self._autocast():
                mix_m, mix_m_labels = self.d_margin(self._seen(fake_mix.detach()))
                mix_s, mix_s_labels = self.d_shape(self._seen(fake_mix.detach()))
            loss_d = loss_d + self.loss.lambda_mix * (
                mix_discriminator_loss(mix_m, mix_m_labels, mix_margins, self.loss.lambda_margin, fake_weight)
                + mix_discriminator_loss(mix_s, mix_s_labels, mix_shapes, self.loss.lambda_shape, fake_weight)
            )
        self.optimizer_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.optimizer_d.step()

        # G: fool D1 and D2 with the true labels, stay close to the input (eq. 5)
        with contextlib.ExitStack() as stack:
            for d in (self.d_margin, self.d_shape):
                if hasattr(d, "no_sync"):  # DDP: D's gradients from this phase are discarded
                    stack.enter_context(d.no_sync())
                # D's weights are constants here: backward computes the gradient of D's input only,
                # not of its weights (which the next D phase would discard): a third of D's backward.
                stack.enter_context(_frozen(d))
            with self._autocast():
                g_m, g_m_labels = self.d_margin(self._seen(fake))
                g_s, g_s_labels = self.d_shape(self._seen(fake))
            loss_g = generator_loss(g_m, g_m_labels, g_s, g_s_labels, margins, shapes, images, fake, self.loss)
            total_g = loss_g["total"]
            if self.loss.lambda_feature_matching:  # G: look like its own input to D1 and D2
                with self._autocast():
                    matched = []
                    for d in (self.d_margin, self.d_shape):
                        with torch.no_grad():
                            real_maps = d(images, features=True)[2]
                        matched.append(feature_matching(d(fake, features=True)[2], real_maps))
                total_g = total_g + self.loss.lambda_feature_matching * torch.stack(matched).mean()
                loss_g["total"] = total_g  # g_loss reports what G minimises
            mix_terms = {}
            if plan is not None:
                with self._autocast():
                    gm_m, gm_m_labels = self.d_margin(self._seen(fake_mix))
                    gm_s, gm_s_labels = self.d_shape(self._seen(fake_mix))
                mix_terms = mix_generator_loss(gm_m, gm_m_labels, gm_s, gm_s_labels, mix_margins, mix_shapes, self.loss)
                total_g = total_g + self.loss.lambda_mix * mix_terms["total"]
            self.optimizer_g.zero_grad(set_to_none=True)
            total_g.backward()
        self.optimizer_g.step()
        if self.average is not None:
            self.average.update(self.generator)
        mix_terms = {f"g_mix_{k}": v.detach() for k, v in mix_terms.items() if k != "total"}
        if mixing and not mix_terms:
            mix_terms = {k: torch.zeros(()) for k in MIX_METRICS}  # no usable pair in this batch
        return {
            "d_margin_loss": loss_m["total"].detach(),
            "d_shape_loss": loss_s["total"].detach(),
            "g_loss": loss_g["total"].detach(),
            "g_adversarial": loss_g["adversarial"].detach(),
            "g_labels": loss_g["labels"].detach(),
            "l1": loss_g["l1"].detach(),
            **mix_terms,  # G's terms on decoded mixes, when LossConfig.lambda_mix > 0
        }


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """Parameters that need no gradient inside the block (their requires_grad restored after)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class WeightAverage:
    """An exponential moving average of a module's parameters (buffers copied as they are).

    ``half_life_images``: after that many training images a past weight counts half
    (beta = 0.5 ** (images_per_step / half_life_images) per step, StyleGAN2-ADA's ema_kimg).
    ``module`` is a frozen eval-mode copy of the unwrapped (non-DDP) network.
    """

    def __init__(self, network: torch.nn.Module, half_life_images: float, images_per_step: int):
        if half_life_images <= 0 or images_per_step <= 0:
            raise ValueError("half_life_images and images_per_step must be > 0")
        self.module = copy.deepcopy(unwrap(network)).eval().requires_grad_(False)
        self.beta = 0.5 ** (images_per_step / half_life_images)

    @torch.no_grad()
    def update(self, network: torch.nn.Module) -> None:
        live = unwrap(network)
        for average, weight in zip(self.module.parameters(), live.parameters()):
            average.lerp_(weight.detach(), 1.0 - self.beta)
        self.copy_buffers(live)

    @torch.no_grad()
    def copy_buffers(self, network: torch.nn.Module) -> None:
        """BatchNorm statistics are not averaged: the average uses the live network's."""
        for average, buffer in zip(self.module.buffers(), unwrap(network).buffers()):
            average.copy_(buffer)


STEP_METRICS = ("d_margin_loss", "d_shape_loss", "g_loss", "g_adversarial", "g_labels", "l1")
MIX_METRICS = ("g_mix_adversarial", "g_mix_labels")


def make_optimizers(generator, d_margin, d_shape, cfg: TrainConfig) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G and one Adam over D1 and D2 (paper 3.2: lr 2e-4, PyTorch default betas)."""
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    optimizer_d = torch.optim.Adam(chain(d_margin.parameters(), d_shape.parameters()), lr=cfg.lr, betas=tuple(cfg.betas))
    return optimizer_g, optimizer_d


def to_model_batch(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """A Ray Data / numpy batch -> (images (B, 1, H, W), margins (B,), shapes (B,)) on `device`."""
    images = torch.as_tensor(batch["image"], dtype=torch.float32).to(device).unsqueeze(1)
    margins = torch.as_tensor(batch["margin"], dtype=torch.int64).to(device)
    shapes = torch.as_tensor(batch["shape"], dtype=torch.int64).to(device)
    return images, margins, shapes


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)
