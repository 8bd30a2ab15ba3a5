"""Configs: validation names the field and value; dict round trips reject unknown keys."""

import dataclasses

import pytest

from kvant.algorithms.registry import config_from_dict, config_from_spec
from kvant.config import ConfigError, GPTQConfig, QuantArgs, RTNConfig


def test_bits_validation():
    with pytest.raises(ConfigError, match=r"bits must be one of \(2, 3, 4, 8\), got 5"):
        RTNConfig(bits=5)
    with pytest.raises(ConfigError, match="bits"):
        QuantArgs(bits=16)


def test_group_size_validation():
    with pytest.raises(ConfigError, match="group_size .* got -2"):
        RTNConfig(group_size=-2)


def test_frozen():
    cfg = RTNConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bits = 3


def test_round_trip_and_unknown_keys():
    cfg = GPTQConfig(bits=3, group_size=64, act_order=True, ignore=("lm_head",))
    d = cfg.to_dict()
    assert d["method"] == "gptq" and d["version"] == 1
    assert config_from_dict(d) == cfg
    with pytest.raises(ConfigError, match=r"unknown GPTQConfig keys: \['blocksize'\]"):
        GPTQConfig.from_dict({"bits": 4, "blocksize": 64})
    with pytest.raises(ConfigError, match="not 'rtn'"):
        RTNConfig.from_dict(d)


def test_gptq_rejects_per_tensor():
    with pytest.raises(ConfigError, match="group_size=0"):
        GPTQConfig(group_size=0)


def test_spec_strings():
    cfg = config_from_spec("rtn:bits=2,group_size=-1,sym=true")
    assert cfg == RTNConfig(bits=2, group_size=-1, sym=True)
    with pytest.raises(ConfigError, match="unknown method"):
        config_from_spec("nope:bits=2")
