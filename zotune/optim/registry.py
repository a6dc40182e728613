"""The registry of methods by name.

`build("mezo", params, lr=1e-6, eps=1e-3)` over parameters or param groups;
`build_for(model, "mezo", lr=1e-6)` over a model, with each method's groups and wiring.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .adamezo import AdaMeZO
from .base import ZOOptimizer
from .blockwise import BlockwiseZO
from .fo import FOSGD, FOAdam
from .forward_grad import ForwardGrad
from .fzoo import FZOO
from .hizoo import HiZOO
from .hparams import Hyperparameter, check
from .hparams import hyperparameters as _of_class
from .hybrid import HybridZOFO
from .lozo import LOZO, LOZOM  # (low-rank methods)
from .mezo import MeZO
from .sparse import RMeZO, SparseMeZO
from .subzero import SubZero  # (low-rank methods)
from .svrg import MeZOSVRG
from .zo_bench import ZOAdam, ZOSGDConservative, ZOSGDMomentum, ZOSGDSign

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "mezo": MeZO,
    "zo-sgd": MeZO,
    "zo-sgd-mmt": ZOSGDMomentum,
    "zo-sgd-sign": ZOSGDSign,
    "zo-sgd-cons": ZOSGDConservative,
    "zo-adam": ZOAdam,
    "forward-grad": ForwardGrad,
    "mezo-svrg": MeZOSVRG,
    "sparse-mezo": SparseMeZO,
    "r-mezo": RMeZO,
    "zo-blockwise": BlockwiseZO,
    "hybrid-zo-fo": HybridZOFO,
    "fo-sgd": FOSGD,
    "fo-adam": FOAdam,
    # -- low-rank directions (issue 21) --
    "lozo": LOZO,
    "lozo-m": LOZOM,
    "subzero": SubZero,
    # -- end low-rank --
}

# -- newer methods (issue 21: FZOO, HiZOO, AdaMeZO) --
OPTIMIZERS.update({"fzoo": FZOO, "hizoo": HiZOO, "adamezo": AdaMeZO})
# -- end newer methods --


def available() -> list[str]:
    """Names accepted by `build`."""
    return sorted(OPTIMIZERS)


def describe() -> list[tuple[str, str, str]]:
    """(name, forward passes per step at the defaults, one-line description) of every
    registered method, by name: read from the classes (`summary`, `forwards`)."""
    return [(n, OPTIMIZERS[n].forwards, OPTIMIZERS[n].summary) for n in available()]  # type: ignore[attr-defined]


def _method(name: str) -> type[torch.optim.Optimizer]:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown method '{name}': choose one of {', '.join(available())}")
    return OPTIMIZERS[name]


def hyperparameters(name: str, *, for_model: bool = False) -> dict[str, Hyperparameter]:
    """The keywords method `name` accepts: in `build` (`for_model=False`: its constructor's),
    or in `build_for` (without the arguments it fills from the model, with its model options,
    e.g. hybrid-zo-fo's `fo_layers`)."""
    cls = _method(name)
    spec = _of_class(cls)
    if for_model:
        spec = {k: v for k, v in spec.items() if k not in cls.wired}  # type: ignore[attr-defined]
        spec.update(cls.model_options)  # type: ignore[attr-defined]
    return spec


def _named(opt: torch.optim.Optimizer, name: str) -> torch.optim.Optimizer:
    opt.name = name  # type: ignore[attr-defined]
    if isinstance(opt, ZOOptimizer):
        opt.trajectory.method = name
    return opt


def build(name: str, params: Iterable[Any], **hparams: Any) -> torch.optim.Optimizer:
    """Create the optimizer registered as `name` over `params` (tensors or param groups).

    Raises ValueError for an unknown hyperparameter (naming the valid ones) or a value that is
    not of the declared type; values given as text ("1e-5", "true", "0.9,0.999") are converted.
    """
    hp = check(name, hyperparameters(name), hparams)
    return _named(OPTIMIZERS[name](params, **hp), name)


def build_for(
    model: torch.nn.Module,
    name: str,
    /,
    *,
    weight_decay: float = 0.0,
    full_loss: Callable[[], Any] | None = None,
    attach: bool = True,
    **hparams: Any,
) -> torch.optim.Optimizer:
    """Create method `name` over `model`'s trainable parameters, as `zotune train` does.

    The method chooses its param groups (decay / no decay by module type, block-wise ZO's one
    per layer, hybrid ZO-FO's split at `fo_layers`) and is given what it needs from the model
    (forward-grad's model, hybrid's backprop part, MeZO-SVRG's `full_loss`: the loss over the
    full training set). A ZO optimizer's trajectory names its tensors (so `replay` finds them
    in a freshly loaded model) and, with `attach`, it perturbs only the embedding rows each
    batch reads (`ZOOptimizer.attach`: the same run, bit for bit). Hyperparameters are checked
    as in `build`; `hyperparameters(name, for_model=True)` lists them.
    """
    cls = _method(name)
    hp = check(name, hyperparameters(name, for_model=True), hparams)
    options = {k: hp.pop(k) for k in cls.model_options if k in hp}  # type: ignore[attr-defined]
    groups, wired = cls.arguments_for(  # type: ignore[attr-defined]
        model, weight_decay=weight_decay, full_loss=full_loss, options=options
    )
    if not groups:
        raise ValueError("the model has no trainable parameters")
    opt = _named(cls(groups, weight_decay=weight_decay, **wired, **hp), name)
    if isinstance(opt, ZOOptimizer):
        opt.trajectory.name_tensors(model, opt.space.tensors)
        if attach:
            opt.attach(model)
    return opt
