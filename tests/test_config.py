"""VesperConfig: presets, validation messages, JSON round trip, parameter counts."""

from __future__ import annotations

import pytest
import torch

import vesper_sdk as vs
from vesper_sdk.config import PRESETS


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_estimate_equals_the_real_model_for_every_preset(preset):
    cfg = vs.VesperConfig.from_preset(preset, vocab_size=4096)
    with torch.device("meta"):  # shapes only: xlarge would need 5 GB of RAM otherwise
        model = vs.VesperLM(cfg)
    assert cfg.num_parameters() == model.num_parameters()


def test_presets_have_the_seed_shapes():
    cfg = vs.VesperConfig.from_preset("medium", vocab_size=1000)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.ffn_hidden_size) == (
        768, 12, 12, 3072)
    assert vs.VesperConfig.from_preset("xlarge").ffn_hidden_size == 5504


def test_json_round_trip_keeps_every_field():
    cfg = vs.VesperConfig.from_preset("small", vocab_size=777, num_experts=4, era_gamma=0.2)
    again = vs.VesperConfig.from_json(cfg.to_json())
    assert again == cfg


@pytest.mark.parametrize("overrides, needle", [
    ({"hidden_size": 100, "num_heads": 3}, "divisible by num_heads"),
    ({"flylora_topk": 40}, "flylora_topk"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"num_experts": 2, "moe_top_k": 3}, "moe_top_k"),
    ({"dropout": 1.5}, "dropout"),
    ({"vocab_size": 100, "eos_token_id": 100}, "eos_token_id"),
])
def test_bad_values_raise_errors_that_name_the_field(overrides, needle):
    with pytest.raises(vs.ConfigError, match=needle):
        vs.VesperConfig.from_preset("tiny", **overrides)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(vs.ConfigError, match="tiny, small, medium, large, xlarge"):
        vs.VesperConfig.from_preset("huge")


def test_unknown_json_field_is_reported():
    with pytest.raises(vs.ConfigError, match="hiden_size"):
        vs.VesperConfig.from_dict({"hiden_size": 3})
