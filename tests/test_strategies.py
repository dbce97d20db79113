"""FedAvg against a hand-computed weighted mean, and the aggregator's update checks."""

import pytest
import torch

from fedcxr.federation.strategies import SiteUpdate, check_update, get_strategy, weighted_average


def test_fedavg_equals_hand_computed_weighted_mean():
    a = SiteUpdate("site-a", 100, {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])})
    b = SiteUpdate("site-b", 300, {"w": torch.tensor([5.0, -2.0]), "b": torch.tensor([4.0])})
    out = weighted_average([b, a])
    # (100*1 + 300*5)/400 = 4.0 ; (100*2 + 300*-2)/400 = -1.0 ; (0 + 300*4)/400 = 3.0
    assert torch.equal(out["w"], torch.tensor([4.0, -1.0]))
    assert torch.equal(out["b"], torch.tensor([3.0]))


def test_fedavg_is_order_independent_and_keeps_dtypes():
    g = torch.Generator().manual_seed(1)
    ups = [
        SiteUpdate(
            f"site-{c}",
            n,
            {"w": torch.randn(50, generator=g), "steps": torch.tensor(n, dtype=torch.int64)},
        )
        for c, n in zip("abcde", (20000, 25000, 15000, 30000, 12000), strict=True)
    ]
    first = weighted_average(ups)
    second = weighted_average(list(reversed(ups)))
    assert torch.equal(first["w"], second["w"])
    assert first["steps"].dtype == torch.int64
    expected = sum(u.n_examples * u.state["w"].double() for u in ups) / 102000
    assert torch.allclose(first["w"].double(), expected, atol=1e-6)


def test_strategy_registry():
    assert get_strategy("fedavg").proximal is False
    assert get_strategy("fedprox").proximal is True
    with pytest.raises(ValueError, match="expected one of"):
        get_strategy("scaffold")


def test_bad_updates_are_refused_with_reasons():
    ref = {"w": torch.zeros(3), "b": torch.zeros(1)}
    ok = SiteUpdate("site-a", 10, {"w": torch.ones(3), "b": torch.ones(1)})
    assert check_update(ref, ok, site_size=10) == []
    cases = {
        "missing tensors": SiteUpdate("s", 1, {"w": torch.ones(3)}),
        "unexpected tensors": SiteUpdate("s", 1, {**ok.state, "x": torch.ones(1)}),
        "shape": SiteUpdate("s", 1, {"w": torch.ones(4), "b": torch.ones(1)}),
        "dtype": SiteUpdate("s", 1, {"w": torch.ones(3, dtype=torch.float64), "b": torch.ones(1)}),
        "non-finite": SiteUpdate(
            "s", 1, {"w": torch.tensor([1.0, float("nan"), 0]), "b": torch.ones(1)}
        ),
        "must be positive": SiteUpdate("s", 0, ok.state),
        "exceeds": SiteUpdate("s", 11, ok.state),
    }
    for reason, update in cases.items():
        problems = check_update(ref, update, site_size=10)
        assert any(reason in p for p in problems), (reason, problems)
