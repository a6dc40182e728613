"""Directions: z depends only on (seed, key, element), laws with unit variance, no correlations."""

from __future__ import annotations

import math

import pytest
import torch

from zotune.engine.directions import Gaussian, derive_seed, hash32, kth_magnitude
from zotune.engine.space import Offset, ParameterSpace
from zotune.engine.torch_path import BLOCK
from zotune.testing import reference_z


def draw_z(shape, seed: int, key: int, direction: str = "gaussian") -> torch.Tensor:
    """z for one tensor, read off by moving a zero tensor to 0 + 1·z."""
    t = torch.zeros(shape)
    ParameterSpace([t], keys=[key], direction=direction).transition(None, Offset(seed, 1.0))
    return t


def test_z_depends_only_on_seed_and_key():
    a, b = torch.zeros(7, 5), torch.zeros(BLOCK + 11)  # b spans two blocks
    ParameterSpace([a, b], keys=[0, 1]).transition(None, Offset(123, 1.0))
    b2, a2 = torch.zeros(BLOCK + 11), torch.zeros(7, 5)
    ParameterSpace([b2, a2], keys=[1, 0], threads=1).transition(None, Offset(123, 1.0))
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert torch.equal(b, draw_z(b.shape, 123, 1))  # alone, without the other tensor
    assert torch.equal(a, reference_z(a.shape, 123, 0))
    assert torch.equal(b, reference_z(b.shape, 123, 1))
    assert not torch.equal(a, draw_z(a.shape, 124, 0))
    assert not torch.equal(a, draw_z(a.shape, 123, 2))


def test_directions_are_uncorrelated_across_steps_keys_and_neighbours():
    """One mixer round over a keyed Weyl sequence (the law's hash): no correlation a 2^18-element
    direction could show between consecutive steps, neighbouring keys or nearby elements, and
    equally filled table cells (deterministic: fixed seeds)."""
    n = 1 << 18
    steps = [draw_z((n,), s, 3) for s in range(8)]
    keys = [draw_z((n,), 7, k) for k in range(8)]
    limit = 5 / n**0.5  # 5 standard errors of a correlation of n independent pairs
    for zs in (steps, keys):
        assert max(abs(float((a * b).mean())) for a, b in zip(zs, zs[1:])) < limit
    for lag in (1, 2, 8, 384, 65536):
        assert max(abs(float((z[:-lag] * z[lag:]).mean())) for z in steps) < limit
    u = torch.cat([hash32(derive_seed(s, 0), 0, n) for s in range(4)])
    cells = torch.bincount(u >> 20, minlength=4096).double()
    expected = u.numel() / 4096
    assert ((cells - expected) ** 2 / expected).sum() / 4095 < 1.2  # chi-square per degree


def test_directions_have_unit_variance():
    table = Gaussian().table.double()
    assert torch.equal(table, -table.flip(0))  # symmetric: mean exactly 0
    var = ((table[:-1] ** 2 + table[:-1] * table[1:] + table[1:] ** 2) / 3).mean()
    assert abs(var - 1) < 1e-6
    g = draw_z((400_000,), 1, 0)
    r = draw_z((400_000,), 1, 0, "rademacher")
    assert abs(g.mean()) < 0.01 and abs(g.var() - 1) < 0.01
    assert abs((g.abs() < 1).float().mean() - 0.6827) < 0.005  # shaped like a normal
    assert abs((g**4).mean() - 3) < 0.1
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.01


@pytest.mark.parametrize("native", ["1", "0"])
def test_kth_magnitude_near_a_guess_equals_a_selection_over_all(native, monkeypatch):
    """Sparse MeZO re-thresholds tied tensors every step from the last threshold: the band
    around it gives kthvalue's h and the counts below and at h exactly, whether h moved a little,
    a lot, or the guess is useless (then the whole tensor is selected over)."""
    monkeypatch.setenv("ZOTUNE_NATIVE", native)
    torch.manual_seed(0)
    x = torch.randn(50_000) * 0.05
    x[:300] = 0.0123  # a tie group (both signs)
    x[300:500] = -0.0123
    x[500:600] = float("-0.0")
    for keep in (1, 17, 20_000, 20_300, 20_700, 49_999, 50_000):
        mags = x.abs()
        h = float(mags.kthvalue(keep).values)
        expected = (h, int((mags < h).sum()), int((mags == h).sum()))
        for near in (None, h, h * 1.001, h * 0.97, h * 3, h / 50, 1e-30, 5e-324, 0.0, math.inf):
            assert kth_magnitude(x, keep, near) == expected, (keep, near)
    # near the answer, only the band is selected over: kthvalue never sees all of x
    selected, kthvalue = [], torch.Tensor.kthvalue
    h = float(x.abs().kthvalue(20_300).values)
    monkeypatch.setattr(
        torch.Tensor, "kthvalue", lambda t, *a: selected.append(t.numel()) or kthvalue(t, *a)
    )
    kth_magnitude(x, 20_300, h * 1.001)
    assert selected and max(selected) < x.numel() // 16
    monkeypatch.undo()
    bf16 = x.bfloat16()  # not float32: the torch band, on |x| in float32
    mags = bf16.abs().float()
    h = float(mags.kthvalue(20_000).values)
    assert kth_magnitude(bf16, 20_000, h * 1.01) == (
        h,
        int((mags < h).sum()),
        int((mags == h).sum()),
    )
