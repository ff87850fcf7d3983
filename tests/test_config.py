"""MARNConfig: defaults of the official code, validation, round trip."""
import pytest

from marn_fast import MARNConfig


def test_defaults_match_the_official_code():
    cfg = MARNConfig(vocab_size=10, num_icd=5)
    assert (cfg.embed_dim, cfg.hidden_size, cfg.dropout) == (100, 300, 0.2)
    assert (cfg.loss, cfg.focal_alpha, cfg.focal_gamma, cfg.focal_balanced) == ("focal", 0.999, 2.0, False)
    assert (cfg.lambda_icd, cfg.lambda_ccs, cfg.max_length) == (0.7, 0.3, 4000)
    assert cfg.use_ram and cfg.freeze_embeddings and cfg.ram_output_tanh and cfg.num_ccs == 0
    assert cfg.ram_channels == (600, 300, 150)


@pytest.mark.parametrize("kwargs, field", [
    (dict(vocab_size=1), "vocab_size"),
    (dict(num_icd=0), "num_icd"),
    (dict(num_ccs=-1), "num_ccs"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(hidden_size=1), "C >= 4"),
    (dict(encoder="lstm"), "encoder"),
    (dict(encoder="cnn", num_filter_maps=0), "num_filter_maps"),
    (dict(encoder="multirescnn", multirescnn_filter_sizes=(3, 4)), "multirescnn_filter_sizes"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(loss="mse"), "loss"),
    (dict(focal_alpha=1.5), "focal_alpha"),
    (dict(focal_gamma=-1.0), "focal_gamma"),
    (dict(lambda_ccs=-0.3), "lambda_icd and lambda_ccs"),
    (dict(max_length=0), "max_length"),
    (dict(embed_dim=2.5), "embed_dim"),
    (dict(use_ram="yes"), "use_ram"),
])
def test_nonsense_values_raise_naming_the_field(kwargs, field):
    base = dict(vocab_size=10, num_icd=5)
    base.update(kwargs)
    with pytest.raises(ValueError, match=field):
        MARNConfig(**base)


def test_feature_size_per_encoder():
    assert MARNConfig(vocab_size=10, num_icd=5, hidden_size=7).ram_channels == (14, 7, 3)
    assert MARNConfig(vocab_size=10, num_icd=5, encoder="cnn").feature_size == 50
    assert MARNConfig(vocab_size=10, num_icd=5, encoder="multirescnn").feature_size == 300


def test_dict_round_trip_and_unknown_keys():
    cfg = MARNConfig(vocab_size=10, num_icd=5, num_ccs=3, loss="bce")
    assert MARNConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        MARNConfig.from_dict({**cfg.to_dict(), "hiden_size": 3})
