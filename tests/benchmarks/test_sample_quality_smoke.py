"""benchmarks/sample_quality.py: the Frechet distance against scipy's sqrtm, and a tiny end-to-end run."""
import json

import numpy as np
import pytest

from benchmarks.sample_quality import frechet_distance, main


def _with_moments(rng, n, mean, cov):
    """n samples whose empirical mean and (ddof=1) covariance are exactly ``mean`` and ``cov``."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_matches_the_closed_form():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    d = 6
    a_, b_ = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a_ @ a_.T + 0.1 * np.eye(d), b_ @ b_.T + 0.1 * np.eye(d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    x, y = _with_moments(rng, 400, m1, s1), _with_moments(rng, 300, m2, s2)
    exact = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy_linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(x, y) == pytest.approx(exact, rel=1e-8)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_tiny_run_writes_the_promised_keys(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "q.json"
    main(["--num", "20", "--rows", "dpmpp_2m_20,cfg_3", "--json", str(out)])
    res = json.loads(out.read_text())
    for key in ("classifier_accuracy", "best_cfg_class_accuracy", "fd_dpmpp_2m_20", "fd_floor"):
        assert np.isfinite(res[key]), key
    assert res["classifier_accuracy"] >= 0.97 and res["fd_floor"] > 0
    assert (tmp_path / "sample_quality_cfg_3.png").exists() and out.with_suffix(".md").exists()
