"""Hand-computed cases, precondition errors and the registry for the Byzantine
update attacks and label flipping in ``attacks/byzantine.py``.

Every expected number is worked out by hand in the comments (or, for the
normal quantiles, checked against an independent ``math.erf`` CDF).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attacks.byzantine import (
    ATTACK_PARAMS,
    ATTACKS,
    Attack,
    alie_z_max,
    build_attack,
    label_flip,
)


def t(rows, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def runnable(name: str) -> dict:
    """Parameters with which attack ``name`` runs on any ``known`` (ALIE needs a z, the
    adaptive attack an aggregation: here the plain mean; gaussian is seeded)."""
    if name == "alie":
        return {"z": 1.0}
    if name == "gaussian":
        return {"seed": 0}
    if name == "adaptive":
        return {"aggregate": lambda x: x.mean(dim=0)}
    return {}


def phi(z: float) -> float:
    """Standard normal CDF via erf (independent of the module's inverse)."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# --------------------------------------------------------------------------- #
# Registry                                                                     #
# --------------------------------------------------------------------------- #
def test_registry_names_and_params():
    assert ATTACKS == ("ipm", "alie", "sign-flip", "gaussian", "mimic", "scaling", "adaptive")
    assert dict(ATTACK_PARAMS) == {
        "ipm": ("epsilon",),
        "alie": ("z", "num_clients", "num_byzantine"),
        "sign-flip": ("scale",),
        "gaussian": ("sigma", "seed"),
        "mimic": ("target",),
        "scaling": ("scale",),
        "adaptive": (
            "base",
            "evals",
            "max_factor",
            "step",
            "base_factor",
            "num_byzantine",
            "aggregate",
        ),
    }
    with pytest.raises(TypeError):
        ATTACK_PARAMS["ipm"] = ("x",)  # type: ignore[index]


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError) as err:
        build_attack("lie")
    msg = str(err.value)
    assert "'lie'" in msg
    for name in ATTACKS:
        assert name in msg
    with pytest.raises(ValueError, match="available"):
        build_attack(3)  # type: ignore[arg-type]


def test_unknown_param_names_attack_param_value_and_allowed():
    with pytest.raises(ValueError) as err:
        build_attack("ipm", z=1.0)
    msg = str(err.value)
    assert "'ipm'" in msg and "'z'" in msg and "1.0" in msg and "epsilon" in msg
    with pytest.raises(ValueError, match="sigma, seed"):
        build_attack("gaussian", scale=2.0)


@pytest.mark.parametrize(
    "name, param, value",
    [
        ("ipm", "epsilon", float("nan")),
        ("ipm", "epsilon", float("inf")),
        ("ipm", "epsilon", "0.1"),
        ("ipm", "epsilon", True),
        ("alie", "z", float("nan")),
        ("sign-flip", "scale", 0.0),
        ("sign-flip", "scale", -1.0),
        ("gaussian", "sigma", 0.0),
        ("gaussian", "sigma", -200.0),
        ("gaussian", "seed", -1),
        ("gaussian", "seed", 1.5),
        ("gaussian", "seed", 2**64),
        ("mimic", "target", -1),
        ("mimic", "target", 1.0),
        ("scaling", "scale", float("inf")),
    ],
)
def test_invalid_values_name_attack_param_and_value(name, param, value):
    params = {param: value}
    if name == "alie":
        params["num_clients"], params["num_byzantine"] = 10, 2
    with pytest.raises(ValueError) as err:
        build_attack(name, **params)
    msg = str(err.value)
    assert repr(name) in msg
    assert f"{param}={value!r}" in msg
    assert "must" in msg  # says what is allowed


def test_repr_name_params_and_roundtrip():
    ipm = build_attack("ipm")
    assert isinstance(ipm, Attack)
    assert repr(ipm) == "ipm(epsilon=0.1)"
    assert ipm.name == "ipm" and ipm.params == {"epsilon": 0.1}
    assert repr(build_attack("sign-flip")) == "sign-flip(scale=1.0)"
    assert repr(build_attack("gaussian", seed=3)) == "gaussian(sigma=200.0, seed=3)"
    assert repr(build_attack("mimic", target=2)) == "mimic(target=2)"
    assert repr(build_attack("scaling")) == "scaling(scale=10.0)"
    alie = build_attack("alie", z=1, num_clients=10, num_byzantine=2)
    assert repr(alie) == "alie(z=1.0, num_clients=10, num_byzantine=2)"
    for name in ATTACKS:
        a = build_attack(name, **({"z": 1.0} if name == "alie" else {}))
        b = build_attack(a.name, **a.params)
        assert repr(a) == repr(b)
        assert set(a.params) == set(ATTACK_PARAMS[name])


# --------------------------------------------------------------------------- #
# Input validation                                                             #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "known, what",
    [
        (torch.ones(3), "2-D"),
        (torch.ones(1, 2, 3), "2-D"),
        (torch.ones(0, 4), "k = 0"),
        (t([[1.0, float("nan")]]), "non-finite"),
        (t([[1.0], [float("-inf")]]), "non-finite"),
        (torch.ones(2, 3, dtype=torch.int64), "floating"),
        ([[1.0, 2.0]], "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("name", ATTACKS)
def test_bad_known_raises(name, known, what):
    attack = build_attack(name, **({"z": 1.0} if name == "alie" else {}))
    with pytest.raises(ValueError, match=what):
        attack(known)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ATTACKS)
def test_output_shape_dtype_device_preserved(name, dtype):
    known = t([[1, -2, 3, 0.5, 4], [0, 1, 1, 2, -3], [2, 2, -1, 0, 1]], dtype=dtype)
    out = build_attack(name, **runnable(name))(known)
    assert out.shape == (5,)
    assert out.dtype == dtype
    assert out.device == known.device
    assert out.is_contiguous()


def test_overflow_in_output_dtype_raises():
    # 1e38 * 10 = 1e39 > float32 max (~3.4e38)
    with pytest.raises(ValueError, match="non-finite"):
        build_attack("scaling", scale=10.0)(t([[1e38, 1.0]]))
    # in float64 the same product is fine
    out = build_attack("scaling", scale=10.0)(t([[1e38, 1.0]], dtype=torch.float64))
    assert out.tolist() == [1e39, 10.0]


# --------------------------------------------------------------------------- #
# IPM                                                                          #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "epsilon, expected",
    [
        # honest mean of [[1, 2], [3, -4]] is [2, -1]
        (0.1, [-0.2, 0.1]),
        (10.0, [-20.0, 10.0]),
        (-10.0, [20.0, -10.0]),
        (0.0, [0.0, 0.0]),
    ],
)
def test_ipm_is_minus_epsilon_times_mean(epsilon, expected):
    out = build_attack("ipm", epsilon=epsilon)(t([[1, 2], [3, -4]]))
    assert torch.equal(out, t(expected))


def test_ipm_default_epsilon_and_single_row():
    # k = 1: the mean is the own update; -0.1 * [5, -30] = [-0.5, 3]
    out = build_attack("ipm")(t([[5, -30]]))
    assert torch.equal(out, t([-0.5, 3.0]))


def test_ipm_accumulates_in_float64():
    # Column 0: 2^24 + 1 + 1 - 2^24 = 2 -> mean 0.5 (float32 running sums lose
    # the 1s next to 2^24, whose float32 spacing is 2). Column 1: (1 + 1 + 0 + 2)/4 = 1.
    known = t([[2.0**24, 1.0], [1.0, 1.0], [1.0, 0.0], [-(2.0**24), 2.0]])
    assert torch.equal(build_attack("ipm", epsilon=1.0)(known), t([-0.5, -1.0]))
    assert torch.equal(build_attack("ipm", epsilon=-4.0)(known), t([2.0, 4.0]))
    # 1e8 + 8 and 1e8 - 8 are float32-representable (spacing 8); mean 1e8
    known = t([[1e8 + 8, 3.0], [1e8 - 8, 5.0]])
    assert torch.equal(build_attack("ipm", epsilon=1.0)(known), t([-1e8, -4.0]))


# --------------------------------------------------------------------------- #
# ALIE                                                                         #
# --------------------------------------------------------------------------- #
def test_alie_3x2_by_hand():
    # column 0: 1, 1, 4 -> mean 2, deviations -1, -1, 2, population var (1+1+4)/3 = 2
    # column 1: 0, 0, 6 -> mean 2, deviations -2, -2, 4, population var (4+4+16)/3 = 8
    known = t([[1, 0], [1, 0], [4, 6]], dtype=torch.float64)
    out = build_attack("alie", z=1.5)(known)
    expected = [2 - 1.5 * math.sqrt(2), 2 - 1.5 * math.sqrt(8)]
    assert out.tolist() == pytest.approx(expected, rel=1e-15)
    # (the unbiased std would give var 3 and 12 instead)
    assert out[0].item() != pytest.approx(2 - 1.5 * math.sqrt(3))
    # z = 0 is the mean, negative z moves the other way
    assert build_attack("alie", z=0.0)(known).tolist() == [2.0, 2.0]
    neg = build_attack("alie", z=-1.0)(known).tolist()
    assert neg == pytest.approx([2 + math.sqrt(2), 2 + math.sqrt(8)], rel=1e-15)


def test_alie_z_from_formula_is_used():
    # n = 25, f = 5: s = floor(13.5) - 5 = 8, z = Phi^{-1}(17/25 = 0.68) ~= 0.4677
    known = t([[1, 0], [1, 0], [4, 6]], dtype=torch.float64)
    attack = build_attack("alie", num_clients=25, num_byzantine=5)
    assert attack.params["z"] == pytest.approx(0.4677, abs=1e-3)
    z = attack.params["z"]
    assert attack(known).tolist() == pytest.approx(
        [2 - z * math.sqrt(2), 2 - z * math.sqrt(8)], rel=1e-15
    )
    # an explicit z wins over the counts
    assert build_attack("alie", z=1.0, num_clients=25, num_byzantine=5).params["z"] == 1.0


def test_alie_single_row_is_the_honest_update():
    own = t([[0.25, -3.0, 7.5]])
    assert torch.equal(build_attack("alie", z=5.0)(own), own[0])


def test_alie_accumulates_in_float64():
    # 2^24 +- 2 are float32-representable; mean 2^24, population std 2, z = 1
    known = t([[2.0**24 + 2, 1.0], [2.0**24 - 2, 3.0]])
    assert torch.equal(build_attack("alie", z=1.0)(known), t([2.0**24 - 2, 1.0]))


def test_alie_needs_z_or_counts():
    for params in ({}, {"num_clients": 10}, {"num_byzantine": 2}):
        with pytest.raises(ValueError, match="num_clients and num_byzantine") as err:
            build_attack("alie", **params)
        assert "z" in str(err.value)
    with pytest.raises(ValueError, match=re.escape("num_clients=10.5")):
        build_attack("alie", z=1.0, num_clients=10.5)


def test_alie_z_max_hand_values():
    # n = 25, f = 5: s = 13 - 5 = 8, (25 - 8)/25 = 0.68, Phi^{-1}(0.68) ~= 0.4677
    z = alie_z_max(25, 5)
    assert z == pytest.approx(0.4677, abs=1e-3)
    assert phi(z) == pytest.approx(0.68, abs=1e-12)
    # n = 10, f = 2: s = 6 - 2 = 4, (10 - 4)/10 = 0.6, Phi^{-1}(0.6) ~= 0.2533
    z = alie_z_max(10, 2)
    assert z == pytest.approx(0.2533, abs=1e-3)
    assert phi(z) == pytest.approx(0.6, abs=1e-12)
    # n = 4, f = 1: s = 3 - 1 = 2, (4 - 2)/4 = 0.5 -> 0; n = 2, f = 1: s = 1 -> 0
    assert alie_z_max(4, 1) == pytest.approx(0.0, abs=1e-12)
    assert alie_z_max(2, 1) == pytest.approx(0.0, abs=1e-12)
    # n = 50, f = 24: s = 26 - 24 = 2, 48/50 = 0.96, Phi^{-1}(0.96) ~= 1.7507
    assert alie_z_max(50, 24) == pytest.approx(1.7507, abs=1e-3)


@pytest.mark.parametrize(
    "n, f, fragment",
    [
        (10, 0, "num_byzantine=0"),
        (1, 1, "num_clients=1"),
        (10, 10, "num_byzantine=10"),
        (10, 6, "num_clients=10, num_byzantine=6"),  # s = 0 -> (n - s)/n = 1
        (3, 2, "num_clients=3, num_byzantine=2"),  # s = 0
        (10.0, 2, "num_clients=10.0"),
    ],
)
def test_alie_z_max_invalid(n, f, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        alie_z_max(n, f)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        build_attack("alie", num_clients=n, num_byzantine=f)


# --------------------------------------------------------------------------- #
# Sign flip                                                                    #
# --------------------------------------------------------------------------- #
def test_sign_flip_by_hand():
    # mean of [[1, -2], [3, 4]] = [2, 1]
    known = t([[1, -2], [3, 4]])
    assert torch.equal(build_attack("sign-flip")(known), t([-2, -1]))
    assert torch.equal(build_attack("sign-flip", scale=2.5)(known), t([-5, -2.5]))
    # k = 1: minus the own update
    assert torch.equal(build_attack("sign-flip")(t([[0.5, -7]])), t([-0.5, 7]))


# --------------------------------------------------------------------------- #
# Gaussian                                                                     #
# --------------------------------------------------------------------------- #
def test_gaussian_seeded_determinism_and_collusion():
    a = build_attack("gaussian", sigma=3.0, seed=7)
    x = torch.zeros(1, 50)
    first = a(x)
    assert torch.equal(a(x), first)  # every call, same vector
    # a colluder with the same seed sends the same vector, whatever it knows
    other = build_attack("gaussian", sigma=3.0, seed=7)(torch.randn(4, 50))
    assert torch.equal(other, first)
    assert not torch.equal(build_attack("gaussian", sigma=3.0, seed=8)(x), first)
    # float64 and float32 agree up to the one rounding
    wide = a(x.double())
    assert torch.equal(wide.float(), first)


def test_gaussian_unseeded_differs_and_leaves_global_rng_alone():
    a = build_attack("gaussian", sigma=1.0)
    x = torch.zeros(1, 64)
    state = torch.get_rng_state()
    assert not torch.equal(a(x), a(x))
    assert torch.equal(torch.get_rng_state(), state)


def test_gaussian_empirical_moments():
    d, sigma = 20000, 200.0
    out = build_attack("gaussian", sigma=sigma, seed=123)(torch.zeros(1, d, dtype=torch.float64))
    std = out.std(unbiased=False).item()
    # relative standard error of the sample std ~ 1/sqrt(2d) = 0.5%
    assert abs(std - sigma) / sigma < 0.05
    # standard error of the sample mean = sigma / sqrt(d) ~= 1.41; allow 5 of them
    assert abs(out.mean().item()) < 5 * sigma / math.sqrt(d)


# --------------------------------------------------------------------------- #
# Mimic                                                                        #
# --------------------------------------------------------------------------- #
def test_mimic_copies_exactly():
    known = t([[1.5, -2.25], [3.125, 4.0], [-0.1, 1e-30]])
    assert torch.equal(build_attack("mimic")(known), known[0])
    out = build_attack("mimic", target=2)(known)
    assert torch.equal(out, known[2])
    out.add_(1.0)  # a copy, not a view
    assert known[2].tolist() == t([-0.1, 1e-30]).tolist()


def test_mimic_bad_target():
    known = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="k = 3") as err:
        build_attack("mimic", target=3)(known)
    assert "target=3" in str(err.value)
    with pytest.raises(ValueError, match="target=-1"):
        build_attack("mimic", target=-1)


# --------------------------------------------------------------------------- #
# Scaling                                                                      #
# --------------------------------------------------------------------------- #
def test_scaling_uses_own_update_only():
    known = t([[1, -2.5], [100, 100]])
    assert torch.equal(build_attack("scaling")(known), t([10, -25]))
    assert torch.equal(build_attack("scaling", scale=-1)(known), t([-1, 2.5]))
    assert torch.equal(build_attack("scaling", scale=0.5)(known), t([0.5, -1.25]))


# --------------------------------------------------------------------------- #
# Label flip                                                                   #
# --------------------------------------------------------------------------- #
def test_label_flip_torch():
    y = torch.tensor([0, 1, 2, 9])
    out = label_flip(y, 10)
    # C - 1 - y with C = 10: 9, 8, 7, 0
    assert torch.equal(out, torch.tensor([9, 8, 7, 0]))
    assert out.dtype == torch.int64
    assert y.tolist() == [0, 1, 2, 9]  # input untouched
    u8 = label_flip(torch.tensor([[0, 3], [1, 2]], dtype=torch.uint8), 4)
    assert u8.dtype == torch.uint8 and u8.tolist() == [[3, 0], [2, 1]]
    assert label_flip(torch.tensor([0, 0]), 1).tolist() == [0, 0]
    assert label_flip(torch.tensor([], dtype=torch.int64), 3).numel() == 0


def test_label_flip_numpy():
    y = np.array([[0, 4], [2, 1]], dtype=np.int32)
    out = label_flip(y, 5)
    # C = 5: 4 - y
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.int32
    assert out.tolist() == [[4, 0], [2, 3]]
    assert y.tolist() == [[0, 4], [2, 1]]
    u8 = label_flip(np.array([0, 9, 5], dtype=np.uint8), 10)
    assert u8.dtype == np.uint8 and u8.tolist() == [9, 0, 4]


@pytest.mark.parametrize(
    "labels, c, fragment",
    [
        (torch.tensor([0, 10]), 10, "max 10"),
        (torch.tensor([-1, 3]), 10, "min -1"),
        (np.array([0, 5]), 5, r"\[0, 5\)"),
        (np.array([-2]), 5, "min -2"),
        (torch.tensor([0.0, 1.0]), 2, "integer dtype"),
        (np.array([0.0, 1.0]), 2, "integer dtype"),
        (torch.tensor([True]), 2, "integer dtype"),
        ([0, 1], 2, "numpy array"),
        (torch.tensor([0, 1]), 0, "num_classes=0"),
        (torch.tensor([0, 1]), 2.0, "num_classes=2.0"),
        (np.array([0, 1], dtype=np.uint8), 300, "does not fit"),
    ],
)
def test_label_flip_errors(labels, c, fragment):
    with pytest.raises(ValueError, match=fragment):
        label_flip(labels, c)


# --------------------------------------------------------------------------- #
# Properties                                                                   #
# --------------------------------------------------------------------------- #
small_ints = st.integers(-1000, 1000).map(float)


@st.composite
def knowns(draw) -> torch.Tensor:
    k = draw(st.integers(1, 6))
    d = draw(st.integers(1, 8))
    rows = draw(st.lists(st.lists(small_ints, min_size=d, max_size=d), min_size=k, max_size=k))
    return t(rows, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(known=knowns())
def test_property_relations(known):
    k = known.shape[0]
    mean = known.sum(dim=0) / k  # integer sums are exact in float64
    assert torch.equal(build_attack("sign-flip")(known), -mean)
    assert torch.equal(build_attack("ipm", epsilon=1.0)(known), -mean)
    assert torch.equal(build_attack("alie", z=0.0)(known), mean)
    alie = build_attack("alie", z=1.0)(known)
    # population std <= (max - min) / 2 (Popoviciu), so mean - std lies in
    # [mean - (max - min) / 2, mean]
    spread = known.max(dim=0).values - known.min(dim=0).values
    assert bool((alie <= mean).all()) and bool((alie >= mean - spread / 2 - 1e-9).all())
    assert torch.equal(build_attack("mimic", target=k - 1)(known), known[k - 1])
    assert torch.equal(build_attack("scaling", scale=1.0)(known), known[0])


# --------------------------------------------------------------------------- #
# CUDA (extra)                                                                 #
# --------------------------------------------------------------------------- #
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ATTACKS)
def test_cuda_matches_cpu(name):
    known = t([[1, -2, 3], [0, 1, 1], [2, 2, -1]])
    attack = build_attack(name, **runnable(name))
    cpu = attack(known)
    gpu = attack(known.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == known.dtype
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
