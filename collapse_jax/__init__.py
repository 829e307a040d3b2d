"""collapse_jax: batched JAX Monte Carlo of model-collapse workflows.

Importing the package turns on JAX's float64 support (``jax_enable_x64``):
statistics are always accumulated in float64 and fits may run in float64.
Arrays that collapse_jax creates carry an explicit dtype, so float32 runs stay
float32 where asked.
"""

import importlib.metadata

import jax

jax.config.update("jax_enable_x64", True)

from ._config import SimulationConfig as SimulationConfig  # noqa: E402
from ._driver import SimulationResult as SimulationResult  # noqa: E402
from ._driver import simulate as simulate  # noqa: E402
from ._driver import simulate_trajectories as simulate_trajectories  # noqa: E402
from ._engine import Trajectory as Trajectory  # noqa: E402
from ._estimators import FitResult as FitResult  # noqa: E402
from ._estimators import least_squares as least_squares  # noqa: E402
from ._estimators import gaussian_fit as gaussian_fit  # noqa: E402
from ._estimators import glm_newton as glm_newton  # noqa: E402
from ._estimators import logistic_newton as logistic_newton  # noqa: E402
from ._estimators import poisson_newton as poisson_newton  # noqa: E402
from ._estimators import ridge_regression as ridge_regression  # noqa: E402
from ._estimators import sample_median as sample_median  # noqa: E402
from ._limit import MEDIAN_EFFICIENCY as MEDIAN_EFFICIENCY  # noqa: E402
from ._limit import LimitConfig as LimitConfig  # noqa: E402
from ._limit import LimitResult as LimitResult  # noqa: E402
from ._limit import limit_exact as limit_exact  # noqa: E402
from ._limit import limit_monte_carlo as limit_monte_carlo  # noqa: E402
from ._limit import limit_ratio as limit_ratio  # noqa: E402
from ._limit import limit_trajectories as limit_trajectories  # noqa: E402
from ._sweep import SweepConfig as SweepConfig  # noqa: E402
from ._sweep import iter_sweep as iter_sweep  # noqa: E402
from ._sweep import load_sweep as load_sweep  # noqa: E402
from ._sweep import run_sweep as run_sweep  # noqa: E402
from ._statistics import Moments as Moments  # noqa: E402
from ._statistics import Summary as Summary  # noqa: E402
from ._statistics import block_moments as block_moments  # noqa: E402
from ._statistics import merge_moments as merge_moments  # noqa: E402
from ._statistics import summarize as summarize  # noqa: E402

try:
    __version__ = importlib.metadata.version("collapse_jax")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
