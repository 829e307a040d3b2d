"""Softmax (multinomial logistic) regression fitted with optax L-BFGS, full batch.

Parametrisation: K classes, class 0 the reference.  For a design row x (p,)
and theta (p, K - 1) the logits are ``[0, x @ theta]``; with K = 2 this is
exactly binary logistic regression with parameter theta[:, 0], so the fit can
be checked against `logistic_newton` (tests do).

The fit maximises the weighted, optionally ridge-penalised log-likelihood

    sum_i w_i sum_k Y_ik log softmax(logits_i)_k  -  (1/2) sum_j ridge_j ||theta_j||^2

where Y (n, K) holds class frequencies (one-hot rows, or label averages over
repeated designs with matching weights, which gives the pooled MLE exactly as
for `logistic_newton`).  L-BFGS runs on that objective divided by sum_i w_i
(a scale-free gradient tolerance) inside ``lax.while_loop``, so it vmaps.
The result is a `FitResult`; a failed fit has ``converged=False`` and theta =
`theta_init`: not converged within the step budget, non-finite values,
coefficients beyond `theta_max`, or a "minimum" at which the objective still
falls along the ray theta -> 2 theta (a separating direction: the loss and
its gradient vanish at infinity, so a small gradient alone proves nothing).
Without a ridge penalty this detection is a heuristic (quasi-separation of a
few points can pass it); with one the minimiser is unique and finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from ._estimators import FitResult


def softmax_logits(x: jax.Array, theta: jax.Array) -> jax.Array:
    """Logits ``[0, x @ theta]``: x (m, p), theta (p, K-1) -> (m, K)."""
    eta = x @ theta
    return jnp.concatenate([jnp.zeros(eta.shape[:-1] + (1,), eta.dtype), eta], axis=-1)


def softmax_objective(theta: jax.Array, x: jax.Array, targets: jax.Array, weights: jax.Array,
                      ridge: jax.Array) -> jax.Array:
    """Penalised negative log-likelihood divided by sum(weights): shape (), dtype of x.

    **Arguments:** theta (p, K-1); x (n, p); targets (n, K) class frequencies
    (rows sum to 1); weights (n,) >= 0; ridge (p,) >= 0 per design column.
    """
    logits = softmax_logits(x, theta)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(targets * logits, axis=-1)
    penalty = 0.5 * jnp.sum(ridge[:, None] * theta * theta)
    return (jnp.sum(weights * nll) + penalty) / jnp.sum(weights)


def _linesearch(kind: str):
    if kind == "zoom":  # optax's default: strong-Wolfe zoom
        return optax.scale_by_zoom_linesearch(max_linesearch_steps=20)
    if kind == "backtracking":  # Armijo backtracking: usually one evaluation per step
        return optax.scale_by_backtracking_linesearch(max_backtracking_steps=30, store_grad=True)
    raise ValueError(f"unknown line search {kind!r}; choose zoom or backtracking")


def softmax_lbfgs(x: jax.Array, targets: jax.Array, weights: jax.Array, theta_init: jax.Array,
                  ridge: jax.Array, max_iterations: int = 500, gtol: float = 1e-7,
                  theta_max: float = 1e3, memory_size: int = 10,
                  linesearch: str = "backtracking") -> FitResult:
    """Softmax-regression (penalised) MLE by optax L-BFGS with a line search.

    **Arguments:** `x` (n, p); `targets` (n, K); `weights` (n,); `theta_init`
    (p, K-1) warm start; `ridge` (p,); static `max_iterations`; `gtol`: stop
    when the max-norm of the gradient of the objective divided by sum(w) is
    at most gtol (default 1e-7: with Hessian eigenvalues >= lambda_min the
    estimate is within gtol / lambda_min of the minimiser and the objective
    within gtol^2 / (2 lambda_min) of its minimum); `theta_max`: larger coefficients mean
    failure (separation); `memory_size` L-BFGS pairs; `linesearch`
    ``"backtracking"`` (Armijo, default) or ``"zoom"`` (strong Wolfe).

    **Returns:** `FitResult(theta (p, K-1), iterations (L-BFGS steps), converged)`.
    """

    def fun(theta):
        return softmax_objective(theta, x, targets, weights, ridge)

    opt = optax.lbfgs(memory_size=memory_size, linesearch=_linesearch(linesearch))

    def cond(carry):
        theta, _, _, grad, it = carry
        g = jnp.max(jnp.abs(grad))
        going = (g > gtol) & jnp.isfinite(g)
        return going & (it < max_iterations) & (jnp.max(jnp.abs(theta)) <= theta_max)

    def body(carry):
        theta, state, value, grad, it = carry
        updates, state = opt.update(grad, state, theta, value=value, grad=grad, value_fn=fun)
        theta = optax.apply_updates(theta, updates)
        # The line search stored the value and gradient at the accepted point.  Reading them
        # back, rather than optax.value_and_grad_from_state (whose lax.cond becomes a select
        # under vmap, so it always recomputes), saves a gradient evaluation per step.
        return theta, state, otu.tree_get(state, "value"), otu.tree_get(state, "grad"), it + 1

    value, grad = jax.value_and_grad(fun)(theta_init)
    theta, state, value, grad, it = jax.lax.while_loop(
        cond, body, (theta_init, opt.init(theta_init), value, grad, jnp.zeros((), jnp.int32))
    )
    g = jnp.max(jnp.abs(grad))
    # Along a separating direction the loss and its gradient vanish as |theta| grows, so a
    # small gradient is not enough: at a genuine minimum the convex objective rises along
    # the ray, f(2 theta) > f(theta); on a separating ray it keeps falling (or underflows).
    rises = (fun(2 * theta) > fun(theta)) | jnp.all(theta == 0)
    ok = (g <= gtol) & jnp.all(jnp.isfinite(theta)) & (jnp.max(jnp.abs(theta)) <= theta_max)
    ok = ok & rises
    return FitResult(jnp.where(ok, theta, theta_init), it, ok)
