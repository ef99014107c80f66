import math

import numpy as np
import pytest
from scipy import stats

from dalda_aug.plan.ags import AGSConfig, Scaling, ags_parameters, sample_lambda, sample_scales
from dalda_aug.errors import InputError


def test_defaults_are_the_papers():
    cfg = AGSConfig()
    assert (cfg.alpha, cfg.low, cfg.high, cfg.sigma_per_shot, cfg.mode) == (0.3, (0.7, 0.9), (0.1, 0.4), 0.05, "truncnorm")


@pytest.mark.parametrize("score,n_shot", [(0.05, 1), (0.3, 1), (0.31, 2), (0.9, 4), (1.0, 1), (0.0, 16), (0.6, 16)])
def test_truncnorm_matches_scipy(score, n_shot):
    cfg = AGSConfig()
    draws = sample_lambda(np.full(4000, score), n_shot, np.random.default_rng(123), cfg)
    low = score <= cfg.alpha
    lo, hi = cfg.low if low else cfg.high
    mu = lo + (hi - lo) * (1 - score)
    sigma = 0.05 * n_shot
    ref = stats.truncnorm((lo - mu) / sigma, (hi - mu) / sigma, loc=mu, scale=sigma)
    assert draws.min() >= lo and draws.max() <= hi
    result = stats.kstest(draws, ref.cdf)
    assert result.pvalue > 1e-3, (score, n_shot, result)
    # no mass piles up on a bound (unlike the clipped normal)
    assert np.mean(draws == lo) + np.mean(draws == hi) < 0.01


def test_truncnorm_mu_on_bound_and_large_sigma_stays_correct():
    # score 1 -> mu at the lower bound; 16 shots -> sigma 0.8, far wider than the range
    draws = sample_lambda(np.ones(5000), 16, 7)
    ref = stats.truncnorm((0.1 - 0.1) / 0.8, (0.4 - 0.1) / 0.8, loc=0.1, scale=0.8)
    assert stats.kstest(draws, ref.cdf).pvalue > 1e-3
    assert 0.1 <= draws.min() and draws.max() <= 0.4


def test_truncnorm_far_tail_is_finite():
    # a range many sigmas from mu must still give finite draws inside it
    cfg = AGSConfig(low=(0.7, 0.9), high=(0.1, 0.4), sigma_per_shot=0.001)
    draws = sample_lambda(np.array([0.0, 1.0]), 1, 0, cfg)
    assert np.all(np.isfinite(draws))
    assert 0.7 <= draws[0] <= 0.9 and 0.1 <= draws[1] <= 0.4


def _reference_clip(scores, n, rng):
    # kkyuhun94/dalda, semantic_aug/augmentations/dalda.py, DALDAAugmentation.forward, lines 128-137:
    #     if clip_score <= threshold_clipscore:            # 0.3
    #         min_val = 0.7; max_val = 0.9
    #         mu = min_val + (max_val - min_val) * (1 - clip_score)
    #         scale = min(max(np.random.normal(mu, self.sigma, 1)[0], min_val), max_val)
    #     else:
    #         min_val = 0.1; max_val = 0.4
    #         mu = min_val + (max_val - min_val) * (1 - clip_score)
    #         scale = min(max(np.random.normal(mu, self.sigma, 1)[0], min_val),
    #                     max_val + 0.1 * math.sqrt(self.examples_per_class))
    # with self.sigma = 0.05 * examples_per_class (line 80). μ uses max_val = 0.4; only the clip
    # bound is widened.
    out = []
    for s in scores:
        if s <= 0.3:
            mu = 0.7 + (0.9 - 0.7) * (1 - s)
            out.append(min(max(rng.normal(mu, 0.05 * n), 0.7), 0.9))
        else:
            mu = 0.1 + (0.4 - 0.1) * (1 - s)
            out.append(min(max(rng.normal(mu, 0.05 * n), 0.1), 0.4 + 0.1 * math.sqrt(n)))
    return np.array(out)


def test_clip_mode_reproduces_reference_formula():
    scores = np.random.default_rng(0).random(500)
    ours = sample_lambda(scores, 4, np.random.default_rng(5), AGSConfig(mode="clip"))
    ref = _reference_clip(scores, 4, np.random.default_rng(5))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    # the widened High upper bound is reachable, and mass piles on the bounds
    assert ours[scores > 0.3].max() > 0.4
    assert np.any(ours == 0.7) or np.any(ours == 0.9) or np.any(ours == 0.1)


@pytest.mark.parametrize("mode", ["truncnorm", "clip"])
def test_mu_uses_the_high_range_upper_bound_04(mode):
    # Worked by hand from the reference's μ line (dalda.py line 136) and the paper's Eq. 3:
    # score 0.5, n = 4: μ = 0.1 + (0.4 - 0.1)·(1 - 0.5) = 0.25 (not 0.35, which 0.4 + 0.1·√4 = 0.6
    # in μ would give); σ = 0.05·4 = 0.2. Score 0.2 (Low), n = 1: μ = 0.7 + 0.2·0.8 = 0.86.
    mu, sigma, lo, hi = ags_parameters([0.5, 0.2], [4, 1], AGSConfig(mode=mode))
    np.testing.assert_allclose(mu, [0.25, 0.86], rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, [0.2, 0.05], rtol=0, atol=1e-12)
    np.testing.assert_allclose(lo, [0.1, 0.7], rtol=0, atol=1e-12)
    # clipping bound: 0.4 + 0.1·√4 = 0.6 in clip mode (dalda.py line 137), the range's 0.4 otherwise
    np.testing.assert_allclose(hi, [0.6 if mode == "clip" else 0.4, 0.9], rtol=0, atol=1e-12)


def test_clip_mode_high_draws_centre_on_025():
    # score 0.5, n = 4 -> normal(0.25, 0.2) clipped to [0.1, 0.6]. Its mean, written out:
    # E[clip(X, a, b)] = a·Φ(α) + b·(1 - Φ(β)) + μ·(Φ(β) - Φ(α)) + σ·(φ(α) - φ(β)),
    # α = (a - μ)/σ = -0.75, β = (b - μ)/σ = 1.75.
    draws = sample_lambda(np.full(20000, 0.5), 4, 11, AGSConfig(mode="clip"))
    al, be = -0.75, 1.75
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    expected = 0.1 * Phi(al) + 0.6 * (1 - Phi(be)) + 0.25 * (Phi(be) - Phi(al)) + 0.2 * (phi(al) - phi(be))
    assert abs(draws.mean() - expected) < 4 * 0.2 / math.sqrt(20000)
    assert draws.min() == 0.1 and draws.max() == 0.4 + 0.1 * math.sqrt(4)  # the clip bound, as computed there
    assert np.mean(draws == 0.1) == pytest.approx(Phi(al), abs=0.015)  # ≈ 22.7 % pile on 0.1


def test_ags_parameters_low_high_split():
    mu, sigma, lo, hi = ags_parameters([0.3, 0.30001], 2)
    assert lo[0] == 0.7 and hi[0] == 0.9 and lo[1] == 0.1 and hi[1] == 0.4
    assert mu[0] == pytest.approx(0.7 + 0.2 * 0.7)
    assert sigma == pytest.approx(0.1)


def test_randomness_only_from_rng():
    a = sample_lambda([0.5, 0.1], 1, np.random.default_rng(3))
    np.random.seed(0)
    b = sample_lambda([0.5, 0.1], 1, np.random.default_rng(3))
    np.random.seed(1)
    c = sample_lambda([0.5, 0.1], 1, 3)  # int seed = default_rng(seed)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, sample_lambda([0.5, 0.1], 1, 4))
    with pytest.raises(InputError, match="rng"):
        sample_lambda([0.5], 1, None)


def test_strategies():
    rs = sample_scales(np.full(2000, 0.5), 1, 0, Scaling("rs"))
    assert stats.kstest(rs, "uniform").pvalue > 1e-3
    fixed = sample_scales([0.2, 0.9], 1, 0, Scaling("fixed", value=0.6))
    np.testing.assert_array_equal(fixed, [0.6, 0.6])
    ags = sample_scales([0.2, 0.9], 1, 0, Scaling("ags"))
    np.testing.assert_array_equal(ags, sample_lambda([0.2, 0.9], 1, 0))


def test_da_fusion_strength_strategy_draws_uniformly_from_its_strengths():
    scaling = Scaling("da-fusion-strength")
    assert scaling.strengths == (1.0, 0.75, 0.5, 0.25)  # DA-Fusion's launch scripts: 1.0-0.75-0.5-0.25
    assert (scaling.draws_strength, scaling.seed_purpose) == (True, "strength")
    assert (Scaling("ags").draws_strength, Scaling("ags").seed_purpose) == (False, "lambda")
    # the draw is rng.integers over the strengths' positions (DA-Fusion's ComposeParallel picks one of
    # four with equal probability); recomputed here from a fresh generator of the same seed
    drawn = sample_scales(np.full(12, 0.5), 1, np.random.default_rng(7), scaling)
    positions = np.random.default_rng(7).integers(0, 4, size=12)
    np.testing.assert_array_equal(drawn, np.array([1.0, 0.75, 0.5, 0.25])[positions])
    many = sample_scales(np.full(8000, 0.5), 1, 0, Scaling("da-fusion-strength", strengths=(0.9, 0.3)))
    values, counts = np.unique(many, return_counts=True)
    assert values.tolist() == [0.3, 0.9] and np.all(np.abs(counts / 8000 - 0.5) < 0.02)
    record = {"strategy": "da-fusion-strength", "strengths": [1.0, 0.75, 0.5, 0.25]}  # what plan.json has held
    assert scaling.to_dict() == record and Scaling.from_dict(record) == scaling
    assert scaling.describe() == "da-fusion-strength(1,0.75,0.5,0.25)"
    assert "strengths" not in Scaling("rs").to_dict()  # the other strategies' records are as before
    for bad in ((), (0.0, 0.5), (1.5,), (float("nan"),), ("x",), 0.5):
        with pytest.raises(InputError, match="strengths must be numbers in \\(0, 1\\]"):
            Scaling("da-fusion-strength", strengths=bad)
    with pytest.raises(InputError, match="strengths must be a list"):
        Scaling.from_dict({"strategy": "da-fusion-strength", "strengths": "1.0"})


def test_parse_scaling():
    assert Scaling.parse("ags").strategy == "ags"
    assert Scaling.parse("rs").strategy == "rs"
    s = Scaling.parse("fixed:0.25")
    assert (s.strategy, s.value) == ("fixed", 0.25)
    assert Scaling.from_dict(s.to_dict()) == s
    for bad in ("agss", "fixed", "fixed:abc", "fixed:-1", "0.5"):
        with pytest.raises(InputError, match="scaling|λ"):
            Scaling.parse(bad)


@pytest.mark.parametrize("scores,n_shot,match", [([1.2], 1, r"1\.2.*outside \[0, 1\]"), ([-0.1], 1, "outside"),
                                                 ([float("nan")], 1, "outside"), ([0.5], 0, "n_shot"),
                                                 ([0.5], 1.5, "n_shot")])
def test_bad_inputs(scores, n_shot, match):
    with pytest.raises(InputError, match=match):
        sample_lambda(scores, n_shot, 0)


@pytest.mark.parametrize("kwargs", [dict(alpha=1.5), dict(low=(0.9, 0.7)), dict(high=(0.1,)), dict(sigma_per_shot=0),
                                    dict(mode="normal")])
def test_config_validation(kwargs):
    with pytest.raises(InputError):
        AGSConfig(**kwargs)
