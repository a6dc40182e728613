"""Optimizers, by name: `build("mezo", params, lr=1e-6, eps=1e-3)` over parameters or param
groups, `build_for(model, "mezo", lr=1e-6)` over a model."""

from __future__ import annotations

from .base import ZOOptimizer
from .blockwise import BlockwiseZO
from .fo import FOSGD, FOAdam
from .forward_grad import ForwardGrad
from .groups import layer_groups, param_groups, split_top
from .hparams import Hyperparameter
from .hybrid import HybridZOFO
from .lozo import LOZO, LOZOM
from .mezo import MeZO
from .registry import OPTIMIZERS, available, build, build_for, hyperparameters
from .replay import replay
from .sparse import RMeZO, SparseMeZO
from .subzero import SubZero
from .svrg import MeZOSVRG
from .zo_bench import ZOAdam, ZOSGDConservative, ZOSGDMomentum, ZOSGDSign

__all__ = [
    "OPTIMIZERS",
    "BlockwiseZO",
    "FOAdam",
    "FOSGD",
    "ForwardGrad",
    "HybridZOFO",
    "LOZO",
    "LOZOM",
    "Hyperparameter",
    "MeZO",
    "MeZOSVRG",
    "RMeZO",
    "SparseMeZO",
    "SubZero",
    "ZOAdam",
    "ZOOptimizer",
    "ZOSGDConservative",
    "ZOSGDMomentum",
    "ZOSGDSign",
    "available",
    "build",
    "build_for",
    "hyperparameters",
    "layer_groups",
    "param_groups",
    "replay",
    "split_top",
]
