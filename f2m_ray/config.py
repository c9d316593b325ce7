"""Configuration: frozen dataclasses, one comment per field; presets are named instances.

A ``ModelConfig`` fixes the network (the paper's topology, widths vary by preset);
a ``TrainConfig`` fixes the optimisation. Both travel into Ray workers as plain
dicts (``asdict``) and are rebuilt with ``from_dict`` on the worker's first line,
and both are stored in every checkpoint, so nothing is repeated on the command line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from f2m_ray.errors import F2MError, first_line
from f2m_ray.labels import MARGINS, SHAPES

ENCODER_LAYERS = 7  # paper 3.2: seven convolutions
DECODER_LAYERS = 7  # paper 3.2: seven transposed convolutions
DISC_CONV_LAYERS = 10  # paper 3.2: ten convolutions ...
DISC_FC_LAYERS = 3  # ... and three fully-connected layers
UPSAMPLE_MODES = ("transposed", "resize")


@dataclass(frozen=True)
class ModelConfig:
    """The generator (E1, E2, encoder, decoder) and the two discriminators."""

    image_size: int = 64  # ROI side in pixels; the topology downsamples 64 -> 1 in six stride-2 steps
    feature_dim: int = 1024  # length of the visual feature v (encoder output)
    embed_hidden: int = 256  # E1/E2: one-hot -> FC embed_hidden -> FC image_size**2
    # Encoder widths, one per conv: a stride-1 stem at 64x64, then six stride-2 convs to 1x1.
    # The last one outputs `feature_dim` channels (the visual feature).
    encoder_channels: tuple[int, ...] = (64, 64, 128, 256, 512, 512, 1024)
    # Decoder widths, one per transposed conv: six stride-2 steps 1x1 -> 64x64, then a
    # stride-1 output conv to 1 channel (tanh).
    decoder_channels: tuple[int, ...] = (512, 512, 256, 128, 64, 32, 1)
    # Discriminator conv widths: pairs of (stride-1, stride-2) convs, 64x64 -> 2x2.
    disc_channels: tuple[int, ...] = (32, 64, 64, 128, 128, 256, 256, 512, 512, 512)
    disc_fc: tuple[int, ...] = (1024, 256)  # hidden FCs; the third FC is the (real/fake, labels) head
    leaky_slope: float = 0.2  # LeakyReLU negative slope (pix2pix/DCGAN convention)
    # The decoder's stride-2 layers: "transposed" (4x4 transposed conv, the paper) or "resize"
    # (nearest x2 + 3x3 conv, no checkerboard; run as the equivalent tied 4x4 transposed conv).
    upsample: str = "transposed"
    n_margins: int = len(MARGINS)  # classes of D1's label head and E1's one-hot input
    n_shapes: int = len(SHAPES)  # classes of D2's label head and E2's one-hot input

    def __post_init__(self) -> None:
        if self.image_size != 64:
            raise F2MError(f"image_size must be 64 (the paper's topology), got {self.image_size}")
        checks = (
            ("encoder_channels", self.encoder_channels, ENCODER_LAYERS),
            ("decoder_channels", self.decoder_channels, DECODER_LAYERS),
            ("disc_channels", self.disc_channels, DISC_CONV_LAYERS),
            ("disc_fc", self.disc_fc, DISC_FC_LAYERS - 1),
        )
        for name, value, length in checks:
            if len(value) != length:
                raise F2MError(f"{name} needs {length} entries, got {len(value)}")
        if self.encoder_channels[-1] != self.feature_dim:
            raise F2MError("the last encoder width must equal feature_dim")
        if self.decoder_channels[-1] != 1:
            raise F2MError("the last decoder width must be 1 (grayscale output)")
        if self.upsample not in UPSAMPLE_MODES:
            raise F2MError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}, got {self.upsample!r}")


@dataclass(frozen=True)
class LossConfig:
    """Weights of eq. 3-5."""

    lambda_margin: float = 10.0  # lambda1: D1's margin label terms (real and fake)
    lambda_shape: float = 10.0  # lambda2: D2's shape label terms (real and fake)
    lambda_generator_labels: float = 10.0  # lambda3: G's label terms through D1 and D2
    lambda_l1: float = 300.0  # lambda4: L1(I, I') reconstruction
    # Share of D's label term applied to fakes (eq. 3-4 as written: 1.0). Below 1, D1/D2
    # learn labels mostly from real masses, so G must draw real margin and shape cues
    # instead of marks that only D reads.
    fake_label_weight: float = 1.0
    # Training for mixes (not in the paper; 0 = eq. 3-5 as written). Each step also decodes
    # variance-preserving mixes of same-category members of the batch (f2m_ray.core.step
    # Feature2MassStep): D1/D2 see them as fakes with their category's labels (AMR, Beckham et
    # al. 2019, with the label terms), and G is trained to make them pass, at this weight.
    lambda_mix: float = 0.0
    # Levers against a category template (not in the paper; the paper's values leave eq. 5 as written).
    lambda_adversarial: float = 1.0  # weight of G's adversarial terms (eq. 5: 1)
    # L1 between the image gradients (finite differences) of I and I': edges, spicules and outlines
    # weigh more than the slow background shading that dominates a whole-image L1.
    lambda_gradient: float = 0.0
    # pix2pixHD feature matching: L1 between D1's and D2's intermediate features of I and of its own
    # reconstruction I' (per sample, real features detached): G is paid for looking like its input
    # to D, not for looking like a category.
    lambda_feature_matching: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data handling for `f2m-ray train`."""

    epochs: int = 8000  # paper 3.2
    batch_size: int = 512  # global batch (split over workers); paper 3.2
    lr: float = 2e-4  # Adam learning rate, PyTorch default betas (paper 3.2)
    betas: tuple[float, float] = (0.9, 0.999)  # PyTorch's Adam defaults, as the paper says
    crop_padding: int = 4  # random crop: pad by this many pixels (reflect), crop back to size
    flips: bool = True  # random horizontal and vertical flips (paper 3.2)
    val_fraction: float = 0.1  # held-out share (by patient) for label accuracy
    seed: int = 0  # seeds data split, init and augmentation
    checkpoint_every: int = 10  # epochs between checkpoints
    keep_checkpoints: int = 3  # keep the last K checkpoints
    sample_every: int = 10  # epochs between sample grids
    bf16: bool = True  # bf16 autocast on GPU (ignored on CPU)
    # Differentiable augmentation (shift, brightness, contrast) of every image D1/D2 see, real and
    # fake, in D's and G's steps (f2m_ray.core.augment.diff_augment). Not in the paper; see `small`.
    d_augment: bool = False
    # An exponential moving average of G's weights (StyleGAN2-ADA's G_ema): its half-life in
    # thousands of images. Samples, feature banks and synthesis use the average, training the live
    # weights; both are in the checkpoint. 0 = none (the paper).
    ema_kimg: float = 0.0


@dataclass(frozen=True)
class Preset:
    """A named (model, loss, train) triple."""

    name: str
    model: ModelConfig
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preset":
        return cls(
            name=data["name"],
            model=build_dataclass(ModelConfig, data["model"]),
            loss=build_dataclass(LossConfig, data.get("loss", {})),
            train=build_dataclass(TrainConfig, data.get("train", {})),
        )

    def with_train(self, **changes: Any) -> "Preset":
        """A copy with some TrainConfig fields replaced (unknown names are refused)."""
        return replace(self, train=build_dataclass(TrainConfig, {**asdict(self.train), **changes}))

    def with_loss(self, **changes: Any) -> "Preset":
        """A copy with some LossConfig fields replaced (unknown names are refused)."""
        return replace(self, loss=build_dataclass(LossConfig, {**asdict(self.loss), **changes}))


def build_dataclass(cls, data: dict[str, Any]):
    """Rebuild a dataclass from a dict (lists back to tuples); refuse unknown keys."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise F2MError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise F2MError(f"bad {cls.__name__}: {err}") from None


def _scaled(width: int) -> ModelConfig:
    """Same topology as the paper with every width divided (paper widths at width=64)."""

    def s(channels: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(max(1, c * width // 64) for c in channels)

    paper = ModelConfig()
    feature_dim = paper.feature_dim * width // 64
    return ModelConfig(
        feature_dim=feature_dim,
        embed_hidden=max(16, paper.embed_hidden * width // 64),
        encoder_channels=s(paper.encoder_channels[:-1]) + (feature_dim,),
        decoder_channels=s(paper.decoder_channels[:-1]) + (1,),
        disc_channels=s(paper.disc_channels),
        disc_fc=s(paper.disc_fc),
    )


PRESETS: dict[str, Preset] = {
    # Section 3.2 exactly.
    "paper": Preset("paper", ModelConfig()),
    # Same topology at a quarter of the widths (256-d feature): trains on a laptop CPU.
    # Batch 32 (lr kept at the paper's 2e-4): on a CPU the cost per image hardly depends on
    # the batch, so half the batch gives twice the optimizer steps in the same CPU-sized budget.
    # D's label term on fakes at 0.1 and D augmentation: D learns margin and shape from real masses
    # (with 1.0, D2 learned marks G painted into its fakes; docs/design.md "Training").
    # A recipe that draws the mass it is given, chosen by benchmarks/recipe_ablation.py (docs/quality.md
    # "Masses of their own"): with the paper's G terms (adversarial 1, labels 3 here) G drew one
    # outline per category whatever the input (held-out identity 0.25 after 800 steps); each of
    # these moves it back towards its input: no label term for G (it paid G for a category
    # prototype), a light adversarial term (0.03), L1 on image gradients (edges and outlines
    # outweigh background shading), resize-conv upsampling (no checkerboard) and an EMA of G.
    "small": Preset(
        "small",
        replace(_scaled(16), upsample="resize"),
        loss=LossConfig(fake_label_weight=0.1, lambda_generator_labels=0.0, lambda_adversarial=0.03,
                        lambda_gradient=100.0),
        train=TrainConfig(epochs=20, batch_size=32, checkpoint_every=5, sample_every=5, d_augment=True, ema_kimg=1.0),
    ),
    # An eighth of `small`: seconds per epoch, for tests and smoke runs.
    "tiny": Preset(
        "tiny",
        _scaled(4),
        train=TrainConfig(epochs=2, batch_size=32, checkpoint_every=1, sample_every=1),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise F2MError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def load_config_file(path: str) -> dict[str, Any]:
    """A run's config file as a dict: TOML (stdlib ``tomllib``), or YAML when PyYAML is installed.

    The caller maps the sections onto the dataclasses above; this only reads and parses.
    """
    import os

    if not os.path.isfile(path):
        raise F2MError(f"config file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".toml":
            import tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise F2MError(f"cannot read {path}: YAML needs PyYAML (pip install pyyaml), or use TOML") from None
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        else:
            raise F2MError(f"config file {path} must end in .toml, .yaml or .yml")
    except F2MError:
        raise
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError
        raise F2MError(f"cannot parse config file {path}: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise F2MError(f"config file {path} must hold a table of settings, got {type(data).__name__}")
    return data
