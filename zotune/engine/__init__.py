"""The engine: random directions drawn from seeds, exact in-place moves of the weights, the
estimators that turn losses into projected gradients, the update rules, and trajectories.

Layers, bottom up: `native` (the optional C kernel) < `directions` (laws, masks and the
parameter space that moves the weights) < `estimators`, `rules` < `trajectory`. Nothing here
imports the optimizers (`zotune.optim`), which compose these parts.
"""
