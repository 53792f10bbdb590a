"""Predictor: fits, prediction arithmetic, online RLS, profiles (load, save, corrupt files)."""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from joulecap.runtime.predictor import Predictor, fit_per_model, fit_universal
from joulecap.runtime.profiles import load_default, load_profile, predictor_from, profile_path, save_profile
from joulecap.runtime.types import Prediction


def test_predict_is_linear_and_split() -> None:
    p = Predictor(2.0, 0.01, 0.5)
    pred = p.predict(100, 50, 10)
    assert pred == Prediction(pytest.approx(2.0 + 0.01 * 150), pytest.approx(5.0), pytest.approx(8.5))
    assert p.decode_j_per_token() == 0.5


def test_token_costs_are_the_per_token_joules_with_the_speed_factor() -> None:
    # What the batched energy accounting weighs one request's tokens against another's with.
    p = Predictor(1.0, 0.01, 0.2, calibrated=True, speed_alpha=1.0)
    assert p.token_costs() == pytest.approx((0.01, 0.2))
    p.update(20, 30, 10, 1.5 * p.predict(20, 30, 10).total_j)  # the device runs dearer
    _, in_j, out_j = p.coefficients
    assert p.speed_factor == pytest.approx(1.5)
    assert p.token_costs() == pytest.approx((1.5 * in_j, 1.5 * out_j))
    assert p.token_costs()[1] == pytest.approx(p.decode_j_per_token())


def test_a_zero_decode_cost_never_makes_a_token_free() -> None:
    p = Predictor(1.0, 0.01, 0.0)
    assert 0.0 < p.decode_j_per_token() <= 1e-12
    assert p.token_costs() == (0.01, 0.0)  # the accounting then splits by plain token counts


@pytest.mark.parametrize("budget", [3.0, 3.49, 3.5, 10.0, 100.0])
def test_max_output_tokens_is_largest_that_fits(budget: float) -> None:
    p = Predictor(2.0, 0.01, 0.5)
    n = p.max_output_tokens(budget, 100, 0)
    assert p.predict(100, 0, n).total_j <= budget + 1e-12
    assert p.predict(100, 0, n + 1).total_j > budget


def test_max_output_tokens_zero_when_prefill_does_not_fit() -> None:
    p = Predictor(2.0, 0.01, 0.5)
    assert p.max_output_tokens(2.5, 100, 0) == 0
    assert p.max_visual_tokens(2.5, 100, 1) == -1
    v = p.max_visual_tokens(4.0, 100, 1)
    assert p.predict(100, v, 1).total_j <= 4.0 < p.predict(100, v + 1, 1).total_j


def _synthetic(n: int = 200, seed: int = 0, noise: float = 0.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    n_in = rng.integers(10, 1000, n).astype(float)
    n_out = rng.integers(1, 256, n).astype(float)
    power = rng.uniform(40, 60, n)
    a_p, a_d, b = 2e-4, 5e-3, 0.1
    energy = power * (a_p * n_in + a_d * n_out + b) * (1 + noise * rng.standard_normal(n))
    return n_in, n_out, power, energy


def test_fit_per_model_recovers_coefficients() -> None:
    n_in, n_out, power, energy = _synthetic()
    fit = fit_per_model(n_in, n_out, energy, power)
    assert fit.coefficients["a_p_s"] == pytest.approx(2e-4, rel=1e-6)
    assert fit.coefficients["a_d_s"] == pytest.approx(5e-3, rel=1e-6)
    assert fit.coefficients["b_s"] == pytest.approx(0.1, rel=1e-6)
    assert fit.a_d_over_a_p == pytest.approx(25.0, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.mape < 1e-9


def test_fit_quality_degrades_with_noise() -> None:
    n_in, n_out, power, energy = _synthetic(noise=0.1)
    fit = fit_per_model(n_in, n_out, energy, power)
    assert 0.02 < fit.mape < 0.2
    assert fit.r2 < 0.999


def test_fit_universal_over_sizes() -> None:
    rng = np.random.default_rng(1)
    s = rng.choice([0.5, 2.0, 7.0], 300)
    n_in = rng.integers(10, 1000, 300).astype(float)
    n_out = rng.integers(1, 256, 300).astype(float)
    true = np.array([10, 3, 0.02, 0.4, 0.04, 0.9])
    x = np.stack([np.ones_like(s), s, n_in, n_out, s * n_in, s * n_out], 1)
    fit = fit_universal(s, n_in, n_out, x @ true)
    got = np.array(list(fit.coefficients.values()))
    np.testing.assert_allclose(got, true, rtol=1e-6)
    assert fit.r2 == pytest.approx(1.0)


def test_rls_converges_and_tracks_mape() -> None:
    p = load_default(0.01)  # wrong by orders of magnitude for this "device"
    true = Predictor(0.05, 1e-4, 2e-3)
    rng = np.random.default_rng(0)
    early = None
    for i in range(200):
        t, v, o = int(rng.integers(5, 100)), int(rng.integers(0, 500)), int(rng.integers(1, 128))
        p.update(t, v, o, true.predict(t, v, o).total_j)
        if i == 19:
            early = p.stats()["mape"]
    assert p.n_updates == 200
    for got, want in zip(p.coefficients, true.coefficients, strict=True):
        assert got == pytest.approx(want, rel=1e-3)
    # Early predictions were far off; the rolling window (last 100) has forgotten them.
    assert early is not None and early > 0.5
    late = p.stats()["mape"]
    assert late is not None and late < 0.01
    assert p.predict(50, 100, 10).total_j == pytest.approx(true.predict(50, 100, 10).total_j, rel=1e-3)


def test_rls_forgetting_follows_a_change() -> None:
    p = Predictor(0.05, 1e-4, 2e-3, calibrated=True, forgetting=0.9)
    rng = np.random.default_rng(1)
    changed = Predictor(0.05, 1e-4, 4e-3)  # the device got slower at decoding
    for _ in range(150):
        t, v, o = int(rng.integers(5, 100)), int(rng.integers(0, 500)), int(rng.integers(1, 128))
        p.update(t, v, o, changed.predict(t, v, o).total_j)
    assert p.coefficients[2] == pytest.approx(4e-3, rel=0.02)


def test_one_outlier_moves_the_model_at_most_by_the_clip() -> None:
    p = Predictor(1.0, 0.01, 0.1, calibrated=True)
    before = p.predict(10, 10, 10).total_j
    p.update(10, 10, 10, before * 50)  # a cold first request
    assert p.predict(10, 10, 10).total_j <= before * 2 + 1e-9
    assert p.stats()["mape"] == pytest.approx(49 / 50)  # the error is still reported as measured


def test_rls_ignores_invalid_measurements_and_constant_inputs_stay_bounded() -> None:
    p = Predictor(1.0, 0.01, 0.1, calibrated=True, forgetting=0.9)
    prior_eig = np.linalg.eigvalsh(np.array(p.covariance())).max()
    p.update(10, 10, 10, float("nan"))
    p.update(10, 10, 10, 0.0)
    assert p.n_updates == 0
    for _ in range(500):  # the same request over and over: covariance must not wind up
        p.update(10, 10, 10, 3.0)
    assert np.all(np.isfinite(p.covariance()))
    assert np.linalg.eigvalsh(np.array(p.covariance())).max() <= 10.0 * prior_eig * (1 + 1e-9)
    assert p.predict(10, 10, 10).total_j == pytest.approx(3.0, rel=1e-6)


def test_constant_traffic_rescales_the_default_instead_of_the_intercept() -> None:
    # Every request alike (same prompt, same length): prefill and decode cannot be told apart,
    # so a mismatch should grow the default's coefficients together (each in proportion to its
    # share of the prediction), not pile it all onto the intercept.
    p = load_default(0.001)
    b0, in0, out0 = p.coefficients
    for _ in range(30):
        p.update(100, 16, 24, 3 * p.predict(100, 16, 24).total_j if p.n_updates == 0 else 9.0)
    b, i, o = p.coefficients
    assert p.predict(100, 16, 24).total_j == pytest.approx(9.0, rel=0.02)
    assert b / b0 > 1.2 and o / out0 > 1.2 and i / in0 > 1.2
    assert p.predict(100, 16, 1).total_j < 0.5 * 9.0  # a one-token answer stays cheaper


def test_stats_fields() -> None:
    p = load_default(2.0)
    stats = p.stats()
    assert stats["calibrated"] is False and stats["source"] == "default"
    assert stats["mape"] is None and stats["n_updates"] == 0
    # The shipped default at S = 2: 16 J fixed, 0.1 J per input token, 2.2 J per output token.
    assert stats["coefficients"]["b_j"] == pytest.approx(16.0, rel=0.01)
    assert stats["coefficients"]["in_j"] == pytest.approx(0.1, rel=0.01)
    assert stats["coefficients"]["out_j"] == pytest.approx(2.2, rel=0.01)
    assert 11 <= stats["a_d_over_a_p"] <= 39  # the published range
    tiny = load_default(0.0).stats()["coefficients"]
    assert tiny["out_j"] == pytest.approx(42.2 * 0.002)
    assert stats["power_w"] == pytest.approx(12.1 * 2 + 42.2)


def test_profile_round_trip(tmp_path: Path) -> None:
    p = Predictor(0.3, 2e-4, 3e-3, calibrated=True, source="calibration:rapl", fit={"r2": 0.99, "mape": 0.02})
    path = save_profile(tmp_path, "org/model", "cpu", "float32", p, params_b=0.1)
    assert path == profile_path(tmp_path, "org/model", "cpu", "float32")
    assert "/" not in path.name
    assert not list(tmp_path.glob("*.tmp"))
    q = load_profile(tmp_path, "org/model", "cpu", "float32", 0.1)
    assert q.calibrated is True
    assert q.coefficients == pytest.approx(p.coefficients)
    assert q.stats()["r2"] == 0.99
    assert q.source == "calibration:rapl"


def test_profiles_load_with_the_learning_settings(tmp_path: Path) -> None:
    # The server's LearningConfig reaches the predictor it plans with, loaded or default.
    saved = Predictor(0.3, 2e-4, 3e-3, calibrated=True)
    save_profile(tmp_path, "m", "cpu", "float32", saved, params_b=0.1)
    data = json.loads(profile_path(tmp_path, "m", "cpu", "float32").read_text())
    for p in (predictor_from(data, speed_alpha=1.0), load_default(0.1, speed_alpha=1.0)):
        p.update(20, 30, 10, 1.5 * p.predict(20, 30, 10).total_j)
        assert p.speed_factor == pytest.approx(1.5)
    still = load_default(0.1)  # speed factor off unless asked for
    still.update(20, 30, 10, 1.5 * still.predict(20, 30, 10).total_j)
    assert still.speed_factor == 1.0
    with pytest.raises(ValueError, match="forgetting"):
        load_default(0.1, forgetting=0.0)


def test_absent_profile_gives_default(tmp_path: Path) -> None:
    p = load_profile(tmp_path / "none", "m", "cpu", "float32", 2.0)
    assert p.calibrated is False
    assert p.coefficients == pytest.approx(load_default(2.0).coefficients)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "unreadable JSON"),
        (json.dumps({"format": "something-else"}), "not a joulecap-profile"),
        (json.dumps([1, 2]), "not a joulecap-profile"),
        (json.dumps({"format": "joulecap-profile", "version": 99}), "unsupported version"),
        (
            json.dumps(
                {
                    "format": "joulecap-profile",
                    "version": 1,
                    "model": "other",
                    "device": "cpu",
                    "dtype": "float32",
                    "coefficients": {"b_j": 1, "in_j": 1, "out_j": 1},
                }
            ),
            "model is 'other'",
        ),
        (
            json.dumps(
                {
                    "format": "joulecap-profile",
                    "version": 1,
                    "model": "m",
                    "device": "cpu",
                    "dtype": "float32",
                    "coefficients": {"b_j": 1, "in_j": "x", "out_j": 1},
                }
            ),
            "coefficient in_j",
        ),
        (
            json.dumps(
                {
                    "format": "joulecap-profile",
                    "version": 1,
                    "model": "m",
                    "device": "cpu",
                    "dtype": "float32",
                    "coefficients": {"b_j": 1, "in_j": 1, "out_j": -1},
                }
            ),
            "out_j must be > 0",
        ),
    ],
)
def test_corrupt_or_foreign_profile_is_refused_with_path_and_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, reason: str
) -> None:
    path = profile_path(tmp_path, "m", "cpu", "float32")
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="joulecap.runtime.profiles"):
        p = load_profile(tmp_path, "m", "cpu", "float32", 1.0)
    assert p.calibrated is False
    assert str(path) in caplog.text
    assert reason in caplog.text


def test_concurrent_profile_writes_leave_a_valid_file(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(20):
                p = Predictor(1.0 + i, 0.01, 0.1 + j, calibrated=True)
                save_profile(tmp_path, "m", "cpu", "float32", p, params_b=1.0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        for _ in range(100):
            path = profile_path(tmp_path, "m", "cpu", "float32")
            if path.exists():
                json.loads(path.read_text())  # never a half-written file

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)] + [
        threading.Thread(target=reader)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert load_profile(tmp_path, "m", "cpu", "float32", 1.0).calibrated is True
    assert not list(tmp_path.glob("*.tmp"))


def test_fit_keeps_per_token_costs_non_negative() -> None:
    # Energy that does not depend on N_in (plus noise that would make its OLS slope negative).
    n_in = np.array([10, 500, 20, 480, 30, 520], dtype=float)
    n_out = np.array([1, 2, 40, 41, 80, 79], dtype=float)
    energy = 1.0 + 0.1 * n_out - 1e-4 * n_in
    fit = fit_per_model(n_in, n_out, energy, 1.0)
    assert fit.coefficients["in_j"] == 0.0
    assert fit.coefficients["out_j"] > 0 and fit.coefficients["b_j"] > 0


def test_relative_fit_favours_small_requests() -> None:
    # A truth the linear model cannot follow exactly (decode slows with length): the absolute fit
    # spends its error on the short requests in relative terms, the relative fit does not.
    n_out = np.array([1, 2, 3, 4, 100, 150, 200], dtype=float)
    n_in = np.full_like(n_out, 50.0)
    energy = 0.05 + 0.1 * n_out + 0.0005 * n_out**2
    absolute = fit_per_model(n_in, n_out, energy, 1.0)
    relative = fit_per_model(n_in, n_out, energy, 1.0, relative=True)
    assert relative.mape < 0.75 * absolute.mape


# ------------------------------------------------------------------ speed factor
def _requests(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    return [
        (int(rng.integers(5, 100)), int(rng.integers(0, 300)), int(rng.integers(1, 64))) for _ in range(n)
    ]


def test_speed_factor_follows_a_slowdown_within_a_few_requests() -> None:
    truth = Predictor(0.05, 1e-4, 2e-3)
    fast = Predictor(*truth.coefficients, calibrated=True, speed_alpha=0.2)
    rls_only = Predictor(*truth.coefficients, calibrated=True)
    for t, v, o in _requests(np.random.default_rng(2), 5):  # the device now runs 30% slower
        for p in (fast, rls_only):
            p.update(t, v, o, 1.3 * truth.predict(t, v, o).total_j)
    want = 1.3 * truth.predict(50, 100, 10).total_j
    assert fast.predict(50, 100, 10).total_j == pytest.approx(want, rel=0.03)
    assert abs(rls_only.predict(50, 100, 10).total_j / want - 1) > 0.05  # RLS alone lags
    assert fast.speed_factor > 1.1 and rls_only.speed_factor == 1.0


def test_speed_factor_returns_to_one_when_rls_has_absorbed_a_lasting_change() -> None:
    p = Predictor(0.05, 1e-4, 2e-3, calibrated=True, forgetting=0.9, speed_alpha=0.2)
    changed = Predictor(0.05 * 1.5, 1e-4 * 1.5, 2e-3 * 1.5)
    for t, v, o in _requests(np.random.default_rng(3), 300):
        p.update(t, v, o, changed.predict(t, v, o).total_j)
    assert p.speed_factor == pytest.approx(1.0, abs=0.01)
    for got, want in zip(p.coefficients, changed.coefficients, strict=True):
        assert got == pytest.approx(want, rel=0.02)


def test_rls_learns_the_same_coefficients_with_or_without_the_speed_factor() -> None:
    rng = np.random.default_rng(4)
    a = Predictor(0.05, 1e-4, 2e-3, calibrated=True)
    b = Predictor(0.05, 1e-4, 2e-3, calibrated=True, speed_alpha=0.5)
    for i, (t, v, o) in enumerate(_requests(rng, 60)):
        e = (1.0 + 0.3 * math.sin(i / 3)) * 0.9 * (0.05 + 1e-4 * (t + v) + 2e-3 * o)
        a.update(t, v, o, e)
        b.update(t, v, o, e)
    assert b.coefficients == pytest.approx(a.coefficients, rel=1e-12)
    assert b.speed_factor != 1.0


def test_speed_factor_scales_every_figure_the_planner_uses() -> None:
    p = Predictor(0.2, 1e-3, 0.01, calibrated=True, speed_alpha=1.0)
    base = p.predict(10, 20, 5)
    p.update(10, 20, 5, 1.5 * base.total_j)
    assert p.speed_factor == pytest.approx(1.5)
    b_j, in_j, out_j = p.coefficients  # RLS moved them a little too: compare with the product
    lin = Predictor(b_j, in_j, out_j).predict(10, 20, 5)
    got = p.predict(10, 20, 5)
    assert got.prefill_j == pytest.approx(1.5 * lin.prefill_j)
    assert got.decode_j == pytest.approx(1.5 * lin.decode_j)
    assert p.decode_j_per_token() == pytest.approx(1.5 * out_j)
    n = p.max_output_tokens(1.0, 10, 20)
    assert p.predict(10, 20, n).total_j <= 1.0 < p.predict(10, 20, n + 1).total_j
    v = p.max_visual_tokens(1.0, 10, 5)
    assert p.predict(10, v, 5).total_j <= 1.0 < p.predict(10, v + 1, 5).total_j
    assert p.stats()["speed_factor"] == pytest.approx(1.5)


def test_one_outlier_moves_the_speed_factor_a_bounded_step() -> None:
    p = Predictor(1.0, 0.01, 0.1, calibrated=True, speed_alpha=0.2)
    p.update(10, 10, 10, p.predict(10, 10, 10).total_j * 50)
    assert p.speed_factor == pytest.approx(2.0**0.2)


def test_speed_factor_lowers_the_error_on_a_device_that_drifts_in_phases() -> None:
    # What the 2-core benchmark VM does: identical work runs up to ~20% faster or slower for a
    # second at a time, with per-request noise on top. Each prediction is scored before its update.
    rng = np.random.default_rng(5)
    truth = Predictor(0.02, 1e-3, 0.03)
    preds = {
        alpha: Predictor(*truth.coefficients, calibrated=True, speed_alpha=alpha) for alpha in (0.0, 0.2)
    }
    speed = 1.0
    errors: dict[float, list[float]] = {alpha: [] for alpha in preds}
    for i, (t, v, o) in enumerate(_requests(rng, 400)):
        if i % 25 == 0:
            speed = float(rng.uniform(0.8, 1.25))
        e = speed * truth.predict(t, v, o).total_j * float(rng.lognormal(0.0, 0.04))
        for alpha, p in preds.items():
            errors[alpha].append(abs(p.predict(t, v, o).total_j / e - 1))
            p.update(t, v, o, e)
    assert np.mean(errors[0.2]) < 0.6 * np.mean(errors[0.0])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_speed_alpha_out_of_range_is_refused(alpha: float) -> None:
    with pytest.raises(ValueError, match="speed_alpha"):
        Predictor(1.0, 0.01, 0.1, speed_alpha=alpha)
