"""Filter patterns: each expands to its documented list, params resolve them, and checkpoints record the result."""

from __future__ import annotations

import copy

import pytest
import yaml
from torch import nn

from inatpipe.errors import ConfigError
from inatpipe.models import build_model
from inatpipe.params import load_params, parse_params
from inatpipe.params.filters import FILTER_PATTERNS, expand_filters

from .conftest import ROOT

# The table in the README's params section.
DOCUMENTED = {
    ("uniform", 32, 5): (32, 32, 32, 32, 32),
    ("doubling", 32, 5): (32, 64, 128, 256, 512),
    ("halving", 32, 5): (512, 256, 128, 64, 32),
    ("bottleneck", 32, 5): (128, 64, 32, 64, 128),
    ("inverted_bottleneck", 32, 5): (32, 64, 128, 64, 32),
    ("bottleneck", 16, 4): (32, 16, 16, 32),
    ("inverted_bottleneck", 16, 4): (16, 32, 32, 16),
    ("doubling", 8, 1): (8,),
}


@pytest.mark.parametrize(("args", "expected"), DOCUMENTED.items(), ids=lambda v: "-".join(map(str, v)))
def test_each_pattern_expands_to_the_documented_list(args, expected):
    assert expand_filters(*args) == expected


def test_every_pattern_is_documented_and_tested():
    assert set(FILTER_PATTERNS) == {"explicit"} | {pattern for pattern, _, _ in DOCUMENTED}


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def with_model(raw: dict, **model) -> dict:
    out = copy.deepcopy(raw)
    out["model"].update(model)
    return out


def test_defaults_keep_todays_architecture():
    p = load_params(ROOT / "params.yaml")
    assert p.model.filter_pattern == "explicit"
    assert p.model.filters == p.model.num_filters == (32, 64, 128, 256, 512)
    # The defaults of base_filters and depth make `doubling` the same network as the explicit list.
    assert expand_filters("doubling", p.model.base_filters, p.model.depth) == p.model.num_filters


def test_a_pattern_replaces_num_filters_in_the_architecture(raw):
    p = parse_params(with_model(raw, filter_pattern="bottleneck", base_filters=4, depth=3, num_filters=[99]))
    assert p.model.filters == (8, 4, 8)
    config = {"image_size": 16, **p.model.architecture()}
    assert config["num_filters"] == [8, 4, 8]
    assert not {"filter_pattern", "base_filters", "depth"} & set(config)
    # What the checkpoint holds is exactly what FlexibleCNN accepts, and it builds the resolved widths.
    model = build_model("flexible_cnn", 3, config)
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [8, 4, 8]


def test_the_depth_check_uses_the_resolved_list(raw):
    raw["data"]["image_size"] = 16  # 2x2 pooling: 16 -> 8 -> 4 -> 2 -> 1 -> nothing at block 5
    parse_params(with_model(raw, num_filters=[8], filter_pattern="uniform", base_filters=8, depth=4))
    with pytest.raises(ConfigError, match=r"model\.filter_pattern uniform has 5 blocks.*at block 5"):
        parse_params(with_model(raw, num_filters=[8], filter_pattern="uniform", base_filters=8, depth=5))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"filter_pattern": "pyramidal"}, "model.filter_pattern must be one of explicit, uniform, doubling"),
        ({"base_filters": 0}, "model.base_filters must be an integer >= 1"),
        ({"depth": 0}, "model.depth must be an integer >= 1"),
        ({"depth": 2.5}, "model.depth must be an integer"),
    ],
)
def test_bad_pattern_settings_name_the_key(raw, model, message):
    with pytest.raises(ConfigError, match=r"^params\.yaml: ") as err:
        parse_params(with_model(raw, **model))
    assert message in str(err.value)
