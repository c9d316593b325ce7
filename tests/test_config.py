import pytest

from f2m_ray.config import PRESETS, ModelConfig, Preset, get_preset
from f2m_ray.errors import F2MError


def test_paper_preset_is_section_3_2():
    p = get_preset("paper")
    assert p.model.image_size == 64 and p.model.feature_dim == 1024 and p.model.embed_hidden == 256
    assert len(p.model.encoder_channels) == 7 and len(p.model.decoder_channels) == 7
    assert len(p.model.disc_channels) == 10 and len(p.model.disc_fc) == 2  # + the head = 3 FCs
    assert (p.loss.lambda_margin, p.loss.lambda_shape, p.loss.lambda_generator_labels, p.loss.lambda_l1) == (10, 10, 10, 300)
    assert (p.train.lr, p.train.betas, p.train.batch_size, p.train.epochs) == (2e-4, (0.9, 0.999), 512, 8000)


@pytest.mark.parametrize("name", list(PRESETS))
def test_round_trip_through_dict(name):
    preset = PRESETS[name]
    assert Preset.from_dict(preset.to_dict()) == preset


def test_smaller_presets_keep_topology():
    for name in ("small", "tiny"):
        m = PRESETS[name].model
        assert len(m.encoder_channels) == 7 and len(m.decoder_channels) == 7 and len(m.disc_channels) == 10
        assert m.feature_dim < PRESETS["paper"].model.feature_dim


def test_unknown_preset_and_fields_refused():
    with pytest.raises(F2MError, match="valid presets: paper, small, tiny"):
        get_preset("huge")
    with pytest.raises(F2MError, match="unknown TrainConfig field"):
        PRESETS["tiny"].with_train(learning_rate=1)
    with pytest.raises(F2MError, match="encoder_channels needs 7"):
        ModelConfig(encoder_channels=(1, 2, 1024), feature_dim=1024)
    assert PRESETS["tiny"].with_train(epochs=5).train.epochs == 5
