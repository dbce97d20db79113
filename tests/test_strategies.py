"""FedAvg and the server optimizers against hand-computed rounds, and the update checks."""

import math

import pytest
import torch

from fedcxr.federation.strategies import (
    STRATEGIES,
    ServerOpt,
    SiteUpdate,
    check_server_state,
    check_update,
    get_strategy,
    weighted_average,
)


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


def test_fedavg_float64_results_do_not_share_the_accumulator():
    def state(v: float) -> dict[str, torch.Tensor]:
        return {"a": torch.full((3,), v, dtype=torch.float64), "b": torch.tensor([v + 10.0])}

    out = weighted_average([SiteUpdate("s1", 1, state(1.0)), SiteUpdate("s2", 1, state(3.0))])
    assert out["a"].tolist() == [2.0, 2.0, 2.0] and out["b"].tolist() == [12.0]


def test_strategy_registry():
    assert get_strategy("fedavg").proximal is False
    assert get_strategy("fedprox").proximal is True
    assert [get_strategy(n).slots for n in ("fedavg", "fedavgm", "fedadam", "fedyogi")] == [
        (),
        ("m",),
        ("m", "v"),
        ("m", "v"),
    ]
    assert get_strategy("fedavgm").server_opt().lr == 1.0
    assert get_strategy("fedadam").server_opt().lr == get_strategy("fedyogi").server_opt().lr
    assert get_strategy("fedadam").server_opt(0.5).lr == 0.5
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


# ------------------------------------------------------------------ server optimizers
#
# Two sites, n = 1 and 3, one weight w and a BatchNorm layer's buffers. Round 1 starts at
# w = 1; site a sends 3, site b 7: avg = (3 + 21) / 4 = 6, so D = 5. Round 2 starts where
# round 1 ended (x1); site a sends x1 - 2, site b x1 - 6: avg = x1 - 5, so D = -5.
# running_mean/var and num_batches_tracked are averaged in both rounds, never stepped.


def two_sites(x: float, a: float, b: float, rnd: int) -> tuple[dict, list[SiteUpdate]]:
    def bn(v: float) -> dict:
        return {
            "bn.running_mean": torch.tensor([v]),
            "bn.running_var": torch.tensor([v + 1]),
            "bn.num_batches_tracked": torch.tensor(int(v), dtype=torch.int64),
        }

    glob = {"w": torch.tensor([x], dtype=torch.float64), **bn(0.0)}
    ups = [
        SiteUpdate("site-b", 3, {"w": torch.tensor([b], dtype=torch.float64), **bn(4.0 * rnd)}),
        SiteUpdate("site-a", 1, {"w": torch.tensor([a], dtype=torch.float64), **bn(8.0 * rnd)}),
    ]
    return glob, ups


def two_rounds(name: str, opt: ServerOpt) -> tuple[list[float], list[dict]]:
    """The weights after rounds 1 and 2, and the server state after each."""
    strategy = get_strategy(name)
    glob, ups = two_sites(1.0, 3.0, 7.0, 1)
    x1, s1 = strategy.aggregate(glob, ups, {}, opt)
    for key, want in (("bn.running_mean", 5.0), ("bn.running_var", 6.0)):  # (8 + 12) / 4 ...
        assert x1[key].item() == want, key
    assert x1["bn.num_batches_tracked"].item() == 5 and not any(
        k.endswith("bn.running_mean") for k in s1
    )
    w1 = x1["w"].item()
    glob, ups = two_sites(w1, w1 - 2.0, w1 - 6.0, 2)
    x2, s2 = strategy.aggregate(glob, ups, s1, opt)
    assert x2["bn.running_mean"].item() == 10.0 and x2["bn.num_batches_tracked"].item() == 10
    return [w1, x2["w"].item()], [s1, s2]


def test_fedavgm_by_hand():
    opt = ServerOpt(lr=0.5, momentum=0.9)
    (w1, w2), (s1, s2) = two_rounds("fedavgm", opt)
    # m1 = 5, x1 = 1 + 0.5 * 5 = 3.5; m2 = 0.9 * 5 - 5 = -0.5, x2 = 3.5 - 0.25 = 3.25
    assert set(s1) == {"m/w"}
    assert s1["m/w"].item() == 5.0 and w1 == 3.5
    assert s2["m/w"].item() == pytest.approx(-0.5, abs=1e-12)
    assert w2 == pytest.approx(3.25, abs=1e-12)


def test_fedadam_by_hand():
    opt = ServerOpt(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    (w1, w2), (s1, s2) = two_rounds("fedadam", opt)
    # v starts at tau^2. m1 = 0.1 * 5 = 0.5; v1 = 0.99e-6 + 0.01 * 25 = 0.25000099
    v1 = 0.99 * 1e-6 + 0.01 * 25
    assert set(s1) == {"m/w", "v/w"}
    assert s1["m/w"].item() == pytest.approx(0.5, abs=1e-12)
    assert s1["v/w"].item() == pytest.approx(v1, abs=1e-12)
    assert w1 == pytest.approx(1 + 0.1 * 0.5 / (math.sqrt(v1) + 1e-3), abs=1e-12)
    # m2 = 0.9 * 0.5 + 0.1 * -5 = -0.05; v2 = 0.99 v1 + 0.01 * 25
    m2, v2 = -0.05, 0.99 * v1 + 0.25
    assert s2["v/w"].item() == pytest.approx(v2, abs=1e-12)
    assert w2 == pytest.approx(w1 + 0.1 * m2 / (math.sqrt(v2) + 1e-3), abs=1e-12)


def test_fedyogi_by_hand():
    opt = ServerOpt(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    (w1, w2), (s1, s2) = two_rounds("fedyogi", opt)
    # v0 = tau^2 < D^2 = 25: v1 = v0 + 0.01 * 25 (grows like Adam, but without the decay of v0)
    v1 = 1e-6 + 0.25
    assert s1["v/w"].item() == pytest.approx(v1, abs=1e-12)
    assert w1 == pytest.approx(1 + 0.1 * 0.5 / (math.sqrt(v1) + 1e-3), abs=1e-12)
    # v1 < 25 again: v2 = v1 + 0.25 (Adam would give 0.99 v1 + 0.25)
    v2 = v1 + 0.25
    assert s2["v/w"].item() == pytest.approx(v2, abs=1e-12)
    assert w2 == pytest.approx(w1 + 0.1 * -0.05 / (math.sqrt(v2) + 1e-3), abs=1e-12)
    # ... and when v exceeds D^2, it shrinks by (1 - beta2) D^2 (sign +1).
    glob, ups = two_sites(0.0, 0.1, 0.1, 1)
    _, s3 = get_strategy("fedyogi").aggregate(
        glob,
        ups,
        {"m/w": torch.zeros(1, dtype=torch.float64), "v/w": torch.ones(1, dtype=torch.float64)},
        opt,
    )
    assert s3["v/w"].item() == pytest.approx(1 - 0.01 * 0.01, abs=1e-12)


def random_updates(seed: int, n_sites: int = 5) -> tuple[dict, list[SiteUpdate]]:
    g = torch.Generator().manual_seed(seed)

    def model() -> dict[str, torch.Tensor]:
        return {
            "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
            "bn.weight": torch.rand(8, generator=g),
            "bn.running_mean": torch.randn(8, generator=g),
            "bn.running_var": torch.rand(8, generator=g) + 0.5,
            "bn.num_batches_tracked": torch.randint(0, 100, (), generator=g),
        }

    sizes = (20000, 25000, 15000, 30000, 12000)[:n_sites]
    ups = [SiteUpdate(f"site-{i}", n, model()) for i, n in enumerate(sizes)]
    return model(), ups


def test_fedavgm_without_momentum_and_unit_step_is_fedavg_exactly():
    opt = get_strategy("fedavgm").server_opt(1.0, momentum=0.0)
    server: dict = {}
    for seed in range(3):  # three rounds, so the (zero) momentum is carried too
        glob, ups = random_updates(seed)
        out, server = get_strategy("fedavgm").aggregate(glob, ups, server, opt)
        plain, none = get_strategy("fedavg").aggregate(glob, ups, {}, opt)
        assert none == {}
        assert out.keys() == plain.keys()
        for key in plain:
            assert out[key].dtype == plain[key].dtype
            assert torch.equal(out[key], plain[key]), key


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_is_order_independent_and_averages_bn_statistics(name):
    strategy = get_strategy(name)
    opt = strategy.server_opt()
    glob, ups = random_updates(7)
    first, s1 = strategy.aggregate(glob, ups, {}, opt)
    second, s2 = strategy.aggregate(glob, list(reversed(ups)), {}, opt)
    again, _ = strategy.aggregate(glob, ups[2:] + ups[:2], s1, opt)  # a second round
    again_rev, _ = strategy.aggregate(glob, list(reversed(ups)), s2, opt)
    avg = weighted_average(ups)
    for key in first:
        assert torch.equal(first[key], second[key]) and torch.equal(again[key], again_rev[key])
        assert first[key].dtype == glob[key].dtype
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(first[key], avg[key]), key  # averaged, never stepped
    stepped = {k.split("/", 1)[1] for k in s1}
    assert stepped == (set() if not strategy.slots else {"conv.weight", "bn.weight"})
    assert check_server_state(strategy, glob, s1) == []


def test_server_state_checks_name_what_is_wrong():
    strategy = get_strategy("fedadam")
    glob, ups = random_updates(3)
    _, server = strategy.aggregate(glob, ups, {}, strategy.server_opt())
    assert check_server_state(strategy, glob, {}) == []  # before the first aggregation
    broken = {k: v for k, v in server.items() if k != "v/bn.weight"}
    broken["m/conv.weight"] = torch.zeros(2)
    broken["m/bn.running_mean"] = torch.zeros(8)
    problems = check_server_state(strategy, glob, broken)
    assert any("missing server state ['v/bn.weight']" in p for p in problems), problems
    assert any("unexpected server state ['m/bn.running_mean']" in p for p in problems), problems
    assert any(p.startswith("m/conv.weight: torch.float32 (2,)") for p in problems), problems
    with pytest.raises(ValueError, match=r"fedadam: server state lacks \['v/bn.weight'"):
        strategy.aggregate(glob, ups, broken, strategy.server_opt())


def test_server_opt_refuses_out_of_range_settings():
    with pytest.raises(ValueError, match=r"lr must be a positive number, found 0.0.*beta2 must"):
        ServerOpt(lr=0.0, beta2=1.0)
    with pytest.raises(ValueError, match="tau must be a positive number"):
        ServerOpt(tau=float("nan"))
