"""Typed, validated view of params.yaml: one frozen dataclass per section, each key's accepted values declared
beside it. No torch import, so the stages and commands that only need params (split, compare, `inatpipe sweep`)
start fast."""

from inatpipe.params.data import DataParams
from inatpipe.params.evaluate import EvaluateParams
from inatpipe.params.load import Params, as_dict, load_params, lookup, parse_params, read_raw
from inatpipe.params.model import ACTIVATIONS, POOLINGS, ModelParams
from inatpipe.params.recipe import RESNET_ARCHS, RESNET_STAGES, RecipeParams, ResnetParams, TrainParams
from inatpipe.params.sweep import SweepParams

__all__ = [
    "ACTIVATIONS",
    "POOLINGS",
    "RESNET_ARCHS",
    "RESNET_STAGES",
    "DataParams",
    "EvaluateParams",
    "ModelParams",
    "Params",
    "RecipeParams",
    "ResnetParams",
    "SweepParams",
    "TrainParams",
    "as_dict",
    "load_params",
    "lookup",
    "parse_params",
    "read_raw",
]
