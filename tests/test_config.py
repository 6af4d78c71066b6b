"""The pack configuration: --bits rules and the JSON round trip."""

import json

import pytest

from mbz.config import LayerInfo, PackConfig, bits_for, parse_bits


def test_parse_bits_keeps_order_and_globs():
    rules = parse_bits("conv=4, fc=2,features.18.*=8,dw=32")
    assert list(rules.items()) == [("conv", 4), ("fc", 2), ("features.18.*", 8), ("dw", 32)]


@pytest.mark.parametrize("text", ["conv=9", "conv=0", "conv", "=4", "conv=four", "", "fc=64"])
def test_parse_bits_rejects_with_a_message(text):
    with pytest.raises(ValueError, match=r"\S"):
        parse_bits(text)


def test_most_specific_rule_wins():
    rules = parse_bits("features.18.*=8,conv=4,dw=6,first=32,fc=2")
    assert bits_for(rules, LayerInfo("features.3.conv.1.0", "conv2d", depthwise=True), 1) == 6
    assert bits_for(rules, LayerInfo("features.3.conv.2", "conv2d", pointwise=True), 1) == 4
    assert bits_for(rules, LayerInfo("features.0.0", "conv2d", first=True), 1) == 32
    assert bits_for(rules, LayerInfo("features.18.0", "conv2d", pointwise=True), 1) == 8
    assert bits_for(rules, LayerInfo("classifier.1", "linear"), 1) == 2
    assert bits_for({"conv": 4}, LayerInfo("classifier.1", "linear"), 7) == 7


def test_config_round_trips_through_json():
    config = PackConfig(bits={"conv": 3, "fc": 2}, method="uniform", prune=0.5, symmetric=True)
    again = PackConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown"):
        PackConfig.from_dict({"bitz": {}})
    with pytest.raises(ValueError, match="prune"):
        PackConfig(prune=1.0)
    with pytest.raises(ValueError, match="method"):
        PackConfig(method="magic")
    with pytest.raises(ValueError, match="2 bits"):
        PackConfig(method="uniform", symmetric=True, bits={"conv": 1})
