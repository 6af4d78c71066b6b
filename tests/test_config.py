"""The pack configuration: --bits rules and the JSON round trip."""

import json

import pytest

from mbz.config import (
    DEFAULT_BITS,
    GROUPS,
    PRUNING_LR,
    LayerInfo,
    PackConfig,
    SelectorError,
    activation_bits,
    bits_for,
    check_selectors,
    config_from_options,
    parse_act_bits,
    parse_bits,
    weight_bits,
)


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


def test_pruning_runs_take_the_learning_rate_of_their_mode_unless_given():
    assert PRUNING_LR["channel"] != PRUNING_LR["weight"]
    for mode, lr in PRUNING_LR.items():
        assert PackConfig(prune=0.5, prune_mode=mode, finetune_epochs=1).pruning_lr() == lr
        given = PackConfig(prune=0.5, prune_mode=mode, finetune_epochs=1, finetune_lr=0.003)
        assert given.pruning_lr() == 0.003
        assert PackConfig.from_dict(json.loads(json.dumps(given.to_dict()))) == given
    with pytest.raises(ValueError, match="learning rate"):
        PackConfig(finetune_lr=0.0)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown"):
        PackConfig.from_dict({"bitz": {}})
    with pytest.raises(ValueError, match="prune"):
        PackConfig(prune=1.0)
    with pytest.raises(ValueError, match="method"):
        PackConfig(method="magic")
    with pytest.raises(ValueError, match="2 bits"):
        PackConfig(method="uniform", symmetric=True, bits={"conv": 1})


def test_a_selector_given_twice_is_an_error():
    with pytest.raises(ValueError, match=r"'fc' is given twice \(fc=2, fc=8\)"):
        parse_bits("fc=2,fc=8")
    with pytest.raises(ValueError, match="given twice"):
        parse_act_bits("relu=4,relu=8")
    with pytest.raises(ValueError, match="several bare numbers"):
        parse_act_bits("8,4")
    assert parse_act_bits("8,relu=4") == {"relu": 4, "add": 8, "proj": 8}  # rules overlay


def test_bits_rules_overlay_the_documented_defaults():
    assert DEFAULT_BITS == {"conv": 4, "fc": 4}
    assert weight_bits("fc=2") == {"conv": 4, "fc": 2}
    assert weight_bits({"dw": 8}) == {"conv": 4, "fc": 4, "dw": 8}
    assert PackConfig().bits == DEFAULT_BITS
    assert activation_bits(None) == {} and activation_bits(8) == parse_act_bits("8")


def test_selectors_must_name_a_group_or_match_a_layer():
    layers = ["features.0.0", "features.1.conv.0.0", "classifier.1"]
    check_selectors({"conv": 4, "features.1.*": 2, "classifier.1": 8}, GROUPS, layers, "--bits")
    with pytest.raises(SelectorError, match=r"'cov', 'feat\.\*' is neither") as error:
        check_selectors({"cov": 2, "feat.*": 2, "fc": 2}, GROUPS, layers, "--bits")
    assert error.value.option == "--bits"
    assert "conv, fc, dw, pw, first" in str(error.value) and "classifier.1" in str(error.value)


def test_config_from_options_takes_flag_named_options():
    config = config_from_options(bits="fc=2", act_bits="8", mean=[0.5, 0.5, 0.5], prune=0.25)
    assert config.bits == {"conv": 4, "fc": 2} and config.act_bits["relu"] == 8
    assert config.mean == (0.5, 0.5, 0.5) and config.prune == 0.25
    with pytest.raises(ValueError, match=r"unknown pack option bitz: use bits, method"):
        config_from_options(bitz="conv=4")
    with pytest.raises(ValueError, match="prune fraction"):
        config_from_options(prune=1.5)
