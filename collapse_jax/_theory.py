"""Closed forms for the models: exact finite-n laws and asymptotic covariances.

Everything here is float64 numpy, no sampling.  Used by the universality
table and its figure (overlays) and by the tests.

- `gaussian_discard_exact`: Gaussian fitting under discard (unbiased
  covariance), exactly at finite n: E||mu_g - mu0||^2 = g tr Sigma0 / n,
  E Sigma_g = Sigma0, E det Sigma_g / det Sigma0 = q^g, the whole covariance
  of theta_g = (mu_g, vech Sigma_g) and so the variance ratio, and for d = 1
  the expected squared Wasserstein-2 distance.
- `linear_fixed_design_exact`: ridge (and least squares, penalty 0) with a
  fixed design, discard or augment: theta_g is linear in the labels, so its
  mean and covariance follow exact linear recursions.
- `asymptotic_covariance`: V, the covariance of sqrt(n)(theta_1 - theta0) as
  n -> infinity, per model; the limit process has Cov(U_g) = c_gg V
  (`collapse_jax._limit`), so n E||theta_g - theta0||^2 -> c_gg tr V.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ._config import SimulationConfig


class GaussianDiscard(NamedTuple):
    """Exact per-generation moments of Gaussian fitting under discard, g = 1..G."""

    mean_sq_error: np.ndarray  # (G,) E ||mu_g - mu0||^2 = g tr Sigma0 / n
    trace_ratio: np.ndarray  # (G,) E tr Sigma_g / tr Sigma0 = 1
    det_ratio: np.ndarray  # (G,) E det Sigma_g / det Sigma0 = q^g
    w2_squared: np.ndarray | None  # (G,) E W_2^2 (d = 1 only; None otherwise)
    cov_trace: np.ndarray  # (G,) tr Cov(theta_g) = E||theta_g - theta0||^2 (theta = (mu, vech S))
    variance_ratio: np.ndarray  # (G,) cov_trace / cov_trace[0]


def gaussian_discard_exact(n: int, generations: int, cov0: np.ndarray) -> GaussianDiscard:
    """Gaussian fitting under discard at finite n, exactly (unbiased covariance, k = n - 1).

    Generation g fits n points x ~ N(mu_{g-1}, Sigma_{g-1}):
    mu_g = mu_{g-1} + L_{g-1} z / sqrt(n) and Sigma_g = L_{g-1} W L_{g-1}^T / k
    with W ~ Wishart_d(k, I) independent of z.  Hence:

    - E[Sigma_g | Sigma_{g-1}] = Sigma_{g-1}: E Sigma_g = Sigma0 (a
      martingale), so E tr Sigma_g / tr Sigma0 = 1 for every g, while
    - E det Sigma_g / det Sigma0 = q^g, q = prod_{i<d} (k - i) / k (E det W =
      prod (k - i)): below 1 for d >= 2, the determinant collapses;
    - Cov(mu_g) = sum_{i<g} E Sigma_i / n = g Sigma0 / n, so
      E||mu_g - mu0||^2 = g tr Sigma0 / n;
    - E[S_ij S_kl | Sigma] = Sigma_ij Sigma_kl + (Sigma_ik Sigma_jl + Sigma_il Sigma_jk) / k
      (Wishart), so M_g = E[Sigma_g (x) Sigma_g] obeys the exact linear recursion
      M_g[ijkl] = M_{g-1}[ijkl] + (M_{g-1}[ikjl] + M_{g-1}[iljk]) / k,
      M_0 = Sigma0 (x) Sigma0, and Var(Sigma_g,ij) = M_g[ijij] - Sigma0_ij^2
      (for d = 1: Var(sigma_g^2) = sigma^4 ((1 + 2/k)^g - 1), the variance grows
      geometrically while the mean stays put);
    - mu_g is uncorrelated with Sigma_g, so tr Cov(theta_g) =
      g tr Sigma0 / n + sum_{i>=j} Var(Sigma_g,ij).  Its ratio to g = 1 tends
      to g as n -> infinity, the limit process's discard ratio;
    - d = 1: W_2^2 = (mu_g - mu0)^2 + (sigma_g - sigma0)^2 and
      E sigma_g = sigma0 c^g with c = E sqrt(chi^2_k / k) =
      sqrt(2/k) Gamma((k+1)/2) / Gamma(k/2), so
      E W_2^2 = g sigma0^2 / n + 2 sigma0^2 (1 - c^g).

    **Arguments:** `n` >= d + 2; `generations` G; `cov0` (d, d) Sigma0.
    """
    cov0 = np.asarray(cov0, np.float64)
    d = cov0.shape[0]
    k = n - 1
    g = np.arange(1, generations + 1, dtype=np.float64)
    m = np.einsum("ij,kl->ijkl", cov0, cov0)
    rows, cols = np.tril_indices(d)
    var_sigma = np.empty(generations)
    for i in range(generations):
        m = m + (np.einsum("ikjl->ijkl", m) + np.einsum("iljk->ijkl", m)) / k
        var_sigma[i] = np.sum(m[rows, cols, rows, cols] - cov0[rows, cols] ** 2)
    tr0 = np.trace(cov0)
    cov_trace = g * tr0 / n + var_sigma
    q = np.prod((k - np.arange(d)) / k)
    w2 = None
    if d == 1:
        c = math.exp(0.5 * math.log(2.0 / k) + math.lgamma((k + 1) / 2) - math.lgamma(k / 2))
        w2 = g * tr0 / n + 2 * tr0 * (1 - c**g)
    return GaussianDiscard(
        mean_sq_error=g * tr0 / n,
        trace_ratio=np.ones(generations),
        det_ratio=q**g,
        w2_squared=w2,
        cov_trace=cov_trace,
        variance_ratio=cov_trace / cov_trace[0],
    )


class LinearExact(NamedTuple):
    mean: np.ndarray  # (G, d) E theta_g
    cov: np.ndarray  # (G, d, d) Cov theta_g
    mse: np.ndarray  # (G,) E ||theta_g - theta0||^2
    variance_ratio: np.ndarray  # (G,) tr Cov theta_g / tr Cov theta_1


def linear_fixed_design_exact(x: np.ndarray, theta0: np.ndarray, sigma: float, penalty: float,
                              workflow: str, generations: int) -> LinearExact:
    """Ridge with a fixed design X, discard or augment, exactly (penalty 0: least squares).

    Labels y_g = X theta_{g-1} + sigma eps_g; with Gram matrix K = X^T X:

    - discard: theta_g = A K theta_{g-1} + A X^T sigma eps_g, A = (K + lam I)^{-1}:
      mean m_g = (A K)^g theta0, Cov_g = (A K) Cov_{g-1} (A K)^T + sigma^2 A K A;
    - augment (one lam on the pooled g n points): b_g = b_{g-1} + K theta_{g-1}
      + sigma X^T eps_g and theta_g = A_g b_g, A_g = (g K + lam I)^{-1}; the
      pair (b_g, theta_g) is an exact linear recursion in the pair before it
      plus independent noise of covariance sigma^2 K, propagated jointly.

    The shrinkage (A K)^g pulls the mean towards 0: ridge is biased, by
    O(lam / n) per generation for Gaussian designs, so asymptotically it is OLS.

    **Arguments:** `x` (n, d); `theta0` (d,); `sigma`, `penalty` (lam >= 0);
    `workflow` ``"discard"`` or ``"augment"``; `generations` G.
    """
    x = np.asarray(x, np.float64)
    theta0 = np.asarray(theta0, np.float64)
    d = x.shape[1]
    gram = x.T @ x
    eye = np.eye(d)
    means, covs = np.empty((generations, d)), np.empty((generations, d, d))
    if workflow == "discard":
        a = np.linalg.inv(gram + penalty * eye)
        b = a @ gram
        mean, cov = theta0, np.zeros((d, d))
        for i in range(generations):
            mean = b @ mean
            cov = b @ cov @ b.T + sigma**2 * a @ gram @ a
            means[i], covs[i] = mean, cov
    elif workflow == "augment":
        # State s = (b, theta): mean (2d,), covariance (2d, 2d).
        mean = np.concatenate([np.zeros(d), theta0])
        cov = np.zeros((2 * d, 2 * d))
        for i in range(generations):
            a = np.linalg.inv((i + 1) * gram + penalty * eye)
            step = np.block([[eye, gram], [a, a @ gram]])  # b_{g-1}, theta_{g-1} -> b_g, theta_g
            noise = np.vstack([eye, a])  # sigma X^T eps_g enters b_g and, through A_g, theta_g
            mean = step @ mean
            cov = step @ cov @ step.T + sigma**2 * noise @ gram @ noise.T
            means[i], covs[i] = mean[d:], cov[d:, d:]
    else:
        raise ValueError(f"workflow must be 'discard' or 'augment', got {workflow!r}")
    tr = np.trace(covs, axis1=1, axis2=2)
    mse = np.sum((means - theta0) ** 2, axis=1) + tr
    return LinearExact(means, covs, mse, tr / tr[0])


def exact_variance_ratio(config: SimulationConfig) -> np.ndarray | None:
    """The exact finite-n variance ratio of a config's fresh-design run, where one is known.

    Discard only: g for ols (theta_g - theta_{g-1} are i.i.d. multivariate t
    increments) and median (i.i.d. medians of N(0, 1) samples, shifted), the
    recursion of `gaussian_discard_exact` for gaussian.  None otherwise.
    """
    if config.workflow != "discard" or config.design != "fresh":
        return None
    g = np.arange(1, config.generations + 1, dtype=np.float64)
    if config.model in ("ols", "median"):
        return g
    if config.model == "gaussian":
        return gaussian_discard_exact(config.n, config.generations, _cov0(config)).variance_ratio
    return None


def _features(config: SimulationConfig) -> np.ndarray:
    if config.feature_cov is None:
        return np.eye(config.d)
    return np.asarray(config.feature_cov, np.float64)


def _cov0(config: SimulationConfig) -> np.ndarray:
    return config.sigma**2 * _features(config)


def _glm_fisher(config: SimulationConfig) -> np.ndarray:
    """E[b''(x.theta0) x x^T] for x ~ N(0, S), by 1-d Gauss-Hermite quadrature (200 nodes).

    With x = L z and u = L^T theta0 = s e (|e| = 1): E[w(z.u) z z^T] =
    a (I - e e^T) + b e e^T, a = E w(s t), b = E[w(s t) t^2], t ~ N(0, 1).
    """
    s_mat = _features(config)
    chol = np.linalg.cholesky(s_mat)
    u = chol.T @ config.theta0_vector
    s = float(np.linalg.norm(u))
    t, wts = np.polynomial.hermite_e.hermegauss(200)
    wts = wts / wts.sum()
    if config.model == "logistic":
        p = 1 / (1 + np.exp(-s * t))
        curv = p * (1 - p)
    else:
        curv = np.exp(s * t)
    a, b = float(wts @ curv), float(wts @ (curv * t * t))
    e = u / s if s > 0 else np.zeros_like(u)
    inner = a * (np.eye(config.d) - np.outer(e, e)) + b * np.outer(e, e)
    return chol @ inner @ chol.T


def asymptotic_covariance(config: SimulationConfig) -> np.ndarray:
    """V (p, p): the limit covariance of sqrt(n) (theta_1 - theta0) for the config's model.

    - ols, ridge (fixed lam: the penalty's effect is O(lam / n)): sigma^2 S^{-1};
    - logistic, poisson: I^{-1}, I = E[b''(x.theta0) x x^T] (poisson: exactly
      e^{theta0' S theta0 / 2} (S + S theta0 theta0' S); here by quadrature);
    - gaussian, theta = (mu, vech Sigma): block diagonal, Sigma0 for mu and
      Cov(S_ij, S_kl) = Sigma_ik Sigma_jl + Sigma_il Sigma_jk for vech Sigma
      (efficient: the inverse Fisher information of (mu, vech Sigma));
    - median: sigma_j sigma_k arcsin(rho_jk) (the covariance of the
      coordinatewise medians' influence functions sign(x_j - theta_j) /
      (2 f_j(0))); for independent coordinates MEDIAN_EFFICIENCY (pi/2) times
      the inverse Fisher information sigma^2 S, which is how it is built
      there (`LimitConfig(efficiency=MEDIAN_EFFICIENCY)`).
    """
    from ._limit import MEDIAN_EFFICIENCY, LimitConfig

    s_mat = _features(config)
    if config.model in ("ols", "ridge"):
        return config.sigma**2 * np.linalg.inv(s_mat)
    if config.model in ("logistic", "poisson"):
        return np.linalg.inv(_glm_fisher(config))
    if config.model == "gaussian":
        cov0 = _cov0(config)
        rows, cols = np.tril_indices(config.d)
        # (ij), (kl) -> Sigma_ik Sigma_jl + Sigma_il Sigma_jk over the vech index pairs.
        block = (cov0[np.ix_(rows, rows)] * cov0[np.ix_(cols, cols)]
                 + cov0[np.ix_(rows, cols)] * cov0[np.ix_(cols, rows)])
        v = np.zeros((config.parameter_dim, config.parameter_dim))
        v[: config.d, : config.d] = cov0
        v[config.d :, config.d :] = block
        return v
    cov0 = _cov0(config)
    sd = np.sqrt(np.diag(cov0))
    rho = cov0 / np.outer(sd, sd)
    if np.allclose(rho, np.eye(config.d)):
        fisher = np.linalg.inv(cov0)
        limit = LimitConfig(d=config.d, fisher=fisher, efficiency=MEDIAN_EFFICIENCY)
        return limit.estimator_cov_matrix
    return np.outer(sd, sd) * np.arcsin(np.clip(rho, -1, 1))
