"""Static configuration of a simulation: a frozen dataclass, validated up front.

Everything here is checked in ``__post_init__``, before any JAX tracing or
compilation, and every problem raises ``ValueError`` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

MODELS = ("ols", "logistic", "poisson", "gaussian", "ridge", "median")
# Models whose data are points x in R^d (no labels, no design): design="fixed" does not apply.
POINT_MODELS = ("gaussian", "median")
WORKFLOWS = ("discard", "augment", "subsample", "subsample-replace")
DESIGNS = ("fresh", "fixed")
DTYPES = ("float32", "float64")
DRAWS = ("auto", "data")
PRNGS = ("philox4x32", "threefry2x32")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown {name} {value!r}{extra}; choose one of {', '.join(allowed)}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _finite(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """What to simulate.  Immutable and hashable; validated on construction.

    **Fields:**

    - `model`: ``"ols"`` (y = x.theta0 + sigma*eps, eps ~ N(0, 1), least
      squares), ``"logistic"`` (y ~ Bernoulli(sigmoid(x.theta0)), MLE by
      Newton's method), ``"poisson"`` (y ~ Poisson(exp(x.theta0)), MLE by
      Newton's method), ``"ridge"`` (OLS labels, fitted by minimising
      ||y - X theta||^2 + ridge_penalty ||theta||^2 over the data fitted),
      ``"gaussian"`` (points x ~ N(mu, Sigma) in R^d, fitted by the sample
      mean and the unbiased sample covariance; theta = (mu, vech Sigma),
      true value mu0 = theta0, Sigma0 = sigma^2 feature_cov) or
      ``"median"`` (points x ~ N(theta, sigma^2 feature_cov), fitted by the
      coordinatewise sample median).  See docs/universality.md.
    - `workflow`: ``"discard"`` (fit generation g+1 on the n newest synthetic
      points), ``"augment"`` (real batch plus every synthetic batch so far),
      ``"subsample"`` (n points drawn without replacement from that pool),
      ``"subsample-replace"`` (with replacement).  Generation 1 is always
      fitted on the n real points.
    - `design`: ``"fresh"`` (new features every generation; Dey & Donoho's
      Algorithm 1) or ``"fixed"`` (one design per trajectory, or the
      user's ``design_matrix`` passed to `simulate`, reused; only labels are
      regenerated: Gerstgrasser et al.).
    - `n`: points per batch; `d`: features; `generations`: G >= 1 fits per
      trajectory; `trajectories`: R independent trajectories.
    - `sigma`: label-noise standard deviation (ols, ridge); the scale of the
      points (gaussian, median); unused by logistic and poisson.
    - `ridge_penalty`: lambda >= 0 of ``model="ridge"`` (a traced value:
      changing it never recompiles); ignored by the other models.
    - `theta0`: the true parameter, length d.  Default: ``theta0_scale *
      ones(d) / sqrt(d)`` (unit norm times the scale), so the signal strength
      x.theta0 ~ N(0, theta0_scale^2) under isotropic features.
    - `feature_cov`: the feature covariance Sigma as a d x d nested tuple
      (default identity); must be symmetric positive definite.
    - `seed`: base PRNG seed.  Trajectory r uses ``fold_in(key(seed), r)``
      and generation g ``fold_in(that, g)`` (g = 0 draws a fixed design).
    - `dtype`: ``"float64"`` (default) or ``"float32"`` for the fits;
      statistics are always accumulated in float64.
    - `block_size`: trajectories per compiled block (default: chosen from
      memory).  Results do not depend on it beyond float64 rounding.
    - `draw`: ``"auto"`` samples the least-squares sufficient statistics
      (X^T X by Bartlett's decomposition of the Wishart law, X^T eps given
      X^T X as a Gaussian) wherever that is exact in distribution (ols and
      ridge with n >= d + 2, discard and augment), and for gaussian discard and augment
      the batch mean and scatter matrix (N(mu, Sigma/n) and, independently,
      Wishart_d(n - 1, Sigma)); ``"data"`` always draws explicit data.
    - `max_newton_iterations`: cap on Newton steps per logistic fit.
    - `prng`: JAX PRNG implementation of the typed keys: ``"philox4x32"``
      (default; Random123's Philox-4x32-10, counter based, measured here
      about 2x faster for normal draws than threefry on CPU and about 4x
      faster to compile under ``vmap``/``scan``) or ``"threefry2x32"``
      (JAX's default).  Different implementations give different (equally
      valid) streams.
    """

    model: str = "ols"
    workflow: str = "augment"
    design: str = "fresh"
    n: int = 100
    d: int = 10
    generations: int = 50
    trajectories: int = 10_000
    sigma: float = 1.0
    ridge_penalty: float = 1.0
    theta0: tuple[float, ...] | None = None
    theta0_scale: float = 1.0
    feature_cov: tuple[tuple[float, ...], ...] | None = None
    seed: int = 0
    dtype: str = "float64"
    block_size: int | None = None
    draw: str = "auto"
    max_newton_iterations: int = 50
    prng: str = "philox4x32"

    def __post_init__(self) -> None:
        _choice("model", self.model, MODELS)
        _choice("workflow", self.workflow, WORKFLOWS)
        _choice("design", self.design, DESIGNS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("draw", self.draw, DRAWS)
        _choice("prng", self.prng, PRNGS)
        for name in ("n", "d", "generations", "trajectories", "max_newton_iterations"):
            _positive_int(name, getattr(self, name))
        if self.block_size is not None:
            _positive_int("block_size", self.block_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.model == "ols" and self.n < self.d + 2:
            raise ValueError(
                f"least squares needs n >= d + 2 for a finite estimator variance, got n={self.n}, d={self.d}"
            )
        if self.model == "logistic" and self.n <= self.d:
            raise ValueError(f"logistic regression needs n > d, got n={self.n}, d={self.d}")
        if self.model == "poisson" and self.n <= self.d:
            raise ValueError(f"poisson regression needs n > d, got n={self.n}, d={self.d}")
        if self.model == "gaussian" and self.n < self.d + 2:
            raise ValueError(
                f"gaussian fitting needs n >= d + 2 (a nonsingular sample covariance whose scatter "
                f"matrix has a Bartlett factor), got n={self.n}, d={self.d}"
            )
        if self.model in POINT_MODELS and self.design != "fresh":
            raise ValueError(
                f"model {self.model!r} fits points x in R^d with no features, so design="
                f"{self.design!r} does not apply; use design='fresh'"
            )
        sigma = _finite("sigma", self.sigma)
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {self.sigma!r}")
        penalty = _finite("ridge_penalty", self.ridge_penalty)
        if penalty < 0:
            raise ValueError(f"ridge_penalty must be >= 0, got {self.ridge_penalty!r}")
        if self.model == "ridge" and penalty == 0 and self.n < self.d + 2:
            raise ValueError(
                f"ridge with ridge_penalty=0 is least squares, which needs n >= d + 2, "
                f"got n={self.n}, d={self.d}"
            )
        _finite("theta0_scale", self.theta0_scale)
        if self.theta0 is not None:
            t = tuple(_finite("theta0", v) for v in self.theta0)
            if len(t) != self.d:
                raise ValueError(f"theta0 has length {len(t)}, expected d={self.d}")
            object.__setattr__(self, "theta0", t)
        if self.feature_cov is not None:
            cov = tuple(tuple(_finite("feature_cov", v) for v in row) for row in self.feature_cov)
            if len(cov) != self.d or any(len(row) != self.d for row in cov):
                raise ValueError(f"feature_cov must be {self.d} x {self.d}")
            import numpy as np

            a = np.asarray(cov)
            if not np.allclose(a, a.T) or np.linalg.eigvalsh(a).min() <= 0:
                raise ValueError("feature_cov must be symmetric positive definite")
            object.__setattr__(self, "feature_cov", cov)

    # -- helpers -----------------------------------------------------------
    @property
    def theta0_vector(self):
        """theta0 as a float64 numpy array of shape (d,)."""
        import numpy as np

        if self.theta0 is not None:
            return np.asarray(self.theta0, np.float64)
        return np.full(self.d, self.theta0_scale / math.sqrt(self.d))

    @property
    def parameter_dim(self) -> int:
        """p, the length of the fitted parameter vector: d + d(d+1)/2 for gaussian, else d."""
        return self.d + self.d * (self.d + 1) // 2 if self.model == "gaussian" else self.d

    @property
    def parameter_vector(self):
        """The true parameter as a float64 numpy array of shape (p,).

        theta0 for every model but gaussian, where it is (mu0, vech Sigma0):
        mu0 = theta0 and Sigma0 = sigma^2 feature_cov, vech the lower
        triangle row by row (entries (i, j), i >= j, in ``numpy.tril_indices``
        order).
        """
        import numpy as np

        theta0 = self.theta0_vector
        if self.model != "gaussian":
            return theta0
        cov = np.eye(self.d) if self.feature_cov is None else np.asarray(self.feature_cov, np.float64)
        return np.concatenate([theta0, self.sigma**2 * cov[np.tril_indices(self.d)]])

    @property
    def uses_sufficient_statistics(self) -> bool:
        """Whether a sufficient-statistic sampler is used (see `draw`).

        Ridge with n < d + 2 (allowed for a positive penalty) draws explicit
        data: the Bartlett factor needs n >= d + 1 and a nonsingular X^T X.
        """
        if self.model == "ridge" and self.n < self.d + 2:
            return False
        return (self.draw == "auto" and self.model in ("ols", "ridge", "gaussian")
                and self.workflow in ("discard", "augment"))

    def replace(self, **changes: Any) -> SimulationConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> SimulationConfig:
        """Build from a mapping, rejecting unknown keys with a suggestion."""
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in mapping:
            if key not in fields:
                hint = difflib.get_close_matches(key, fields, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ValueError(f"unknown option {key!r}{extra}")
        kwargs = dict(mapping)
        for key in ("theta0",):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        if kwargs.get("feature_cov") is not None:
            kwargs["feature_cov"] = tuple(tuple(r) for r in kwargs["feature_cov"])
        return cls(**kwargs)
