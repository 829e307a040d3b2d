"""Time the Gaussian-process limit: JAX Monte Carlo, plain numpy, exact propagation.

    python benchmarks/bench_limit.py [--draws N] [--large] [--generations G] [--json PATH]

One process, one table (d = 1, MLE: V = I^{-1} = 1).  Rows:

- ``jax all-4``: `limit_monte_carlo` with the four workflows in one kernel
  (common random numbers, what ``collapse-jax figure1`` runs), `--draws`
  draws (default 10^6); with `--large` also 10^7.  One block at a time,
  and `--workers` blocks at once in threads (default 2; what
  `limit_monte_carlo` does by default on CPU).
- ``jax <workflow>``: one workflow per kernel, `--single-draws` draws each
  (default 250,000): the per-workflow rate.
- ``numpy all-4`` / ``numpy <workflow>``: a plain vectorized numpy program of
  the same recursion (PCG64 normals, a loop over generations on arrays of
  draws, the same moment sums reduced with ``np.einsum``), `--numpy-draws`
  draws (default 100,000).
- ``exact``: `limit_exact` (covariance propagation, O(G^2)) for the four
  workflows, against the same covariances from an explicit linear map U = L xi
  of the noises (c = L L^T, O(G^3)); the max |difference| is printed.

Rates: draws/s and workflow trajectory-steps/s (draws x G x workflows / s),
excluding compilation (its own column).  Ratio = JAX rate / numpy rate for
the same workflow set.  Column ``|z|max``: the largest |MC - exact| / SE of
the ratio over generations and workflows, a check that both computed the
right thing.  Wall times on a shared machine vary with its load; the load
average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import collapse_jax  # noqa: F401  (float64)
from collapse_jax._limit import LimitConfig, limit_exact, limit_monte_carlo, limit_ratio
from collapse_jax._statistics import Moments, merge_moments, summarize, zero_moments

WORKFLOWS = ("discard", "augment", "subsample", "subsample-replace")


def numpy_limit(
    workflows: tuple[str, ...], generations: int, draws: int, seed: int = 0, block: int = 10_000
) -> dict:
    """The limit recursion in plain vectorized numpy (d = 1, V = I = 1): {workflow: Summary}."""
    rng = np.random.default_rng(seed)
    G = generations
    sub = any(w.startswith("subsample") for w in workflows)
    moments = {w: zero_moments(G, 1) for w in workflows}
    done = 0
    while done < draws:
        b = min(block, draws - done)
        state = {w: (np.zeros(b), np.zeros(b)) for w in workflows}
        paths = {w: np.empty((b, G)) for w in workflows}
        for g in range(1, G + 1):
            a = rng.standard_normal(b)
            c = rng.standard_normal(b) if sub else None
            for w in workflows:
                s, u = state[w]
                p = a + u
                if w == "discard":
                    s, u = p, p
                else:
                    s = s + p
                    u = s / g
                    if w == "subsample":
                        u = u + np.sqrt(1 - 1 / g) * c
                    elif w == "subsample-replace" and g >= 2:
                        u = u + c
                state[w] = (s, u)
                paths[w][:, g - 1] = u
        for w in workflows:
            u = paths[w]
            u1 = np.broadcast_to(u[:, :1], u.shape)
            f = np.stack([u, u * u, u1, u1 * u1], axis=-1)  # (b, G, 4)
            m = Moments(
                np.full(G, float(b)), f.sum(0), np.einsum("rgi,rgj->gij", f, f, optimize=True)
            )
            moments[w] = merge_moments(moments[w], m)
        done += b
    return {w: summarize(m) for w, m in moments.items()}


def exact_linear_map(workflow: str, generations: int) -> np.ndarray:
    """c = L L^T with U = L xi, xi = (A_1..A_G, C_1..C_G): the O(G^3) way."""
    G = generations
    L = np.zeros((G + 1, 2 * G))  # row g: U_g (row 0: U_0 = 0)
    S = np.zeros(2 * G)
    for g in range(1, G + 1):
        p = L[g - 1].copy()
        p[g - 1] += 1.0  # + A_g
        if workflow == "discard":
            L[g] = p
            continue
        S = S + p
        L[g] = S / g
        scale = (
            np.sqrt(1 - 1 / g)
            if workflow == "subsample"
            else float(workflow == "subsample-replace" and g >= 2)
        )
        L[g, G + g - 1] += scale  # + s_g C_g
    return L[1:] @ L[1:].T


def zmax(summaries: dict, G: int) -> float:
    z = [
        np.abs(s.variance_ratio[1:] - limit_ratio(w, G)[1:]) / s.variance_ratio_se[1:]
        for w, s in summaries.items()
    ]
    return float(np.max(z))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=100)
    ap.add_argument("--draws", type=int, default=1_000_000)
    ap.add_argument("--large", action="store_true", help="also 10^7 draws (all four workflows)")
    ap.add_argument("--single-draws", type=int, default=250_000)
    ap.add_argument("--numpy-draws", type=int, default=100_000)
    ap.add_argument(
        "--workers", type=int, default=2, help="also time all-4 with this many blocks at once (threads)"
    )
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    G = args.generations
    rows = []

    def row(name, nw, draws, wall, compile_s, z):
        run = wall - compile_s
        rows.append(
            {
                "case": name,
                "workflows": nw,
                "draws": draws,
                "wall_s": wall,
                "compile_s": compile_s,
                "draws_per_s": draws / run,
                "steps_per_s": draws * G * nw / run,
                "zmax": z,
            }
        )
        r = rows[-1]
        print(
            f"{name:<24} {draws:>10,} {wall:>8.2f} {compile_s:>8.2f} {r['draws_per_s']:>12,.0f} "
            f"{r['steps_per_s']:>14.3g} {z:>6.2f}",
            flush=True,
        )

    print(
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; G = {G}, d = 1, float64"
    )
    print(
        f"{'case':<24} {'draws':>10} {'wall_s':>8} {'compile':>8} {'draws/s':>12} "
        f"{'wf-steps/s':>14} {'|z|max':>6}"
    )
    sizes = [args.draws] + ([10_000_000] if args.large else [])
    for n in sizes:
        res = limit_monte_carlo(LimitConfig(workflows=WORKFLOWS, generations=G, draws=n),
                                workers=1)
        row("jax all-4", 4, n, res.wall_time, res.compile_time, zmax(res.summaries, G))
        if args.workers > 1:
            res = limit_monte_carlo(
                LimitConfig(workflows=WORKFLOWS, generations=G, draws=n), workers=args.workers
            )
            name = f"jax all-4 ({args.workers} workers)"
            row(name, 4, n, res.wall_time, res.compile_time, zmax(res.summaries, G))
    for w in WORKFLOWS:
        res = limit_monte_carlo(LimitConfig(workflows=w, generations=G, draws=args.single_draws),
                                workers=1)
        row(
            f"jax {w}",
            1,
            args.single_draws,
            res.wall_time,
            res.compile_time,
            zmax(res.summaries, G),
        )
    for wf in (WORKFLOWS, *((w,) for w in WORKFLOWS)):
        t = time.perf_counter()
        s = numpy_limit(wf, G, args.numpy_draws)
        row(
            f"numpy {'all-4' if len(wf) == 4 else wf[0]}",
            len(wf),
            args.numpy_draws,
            time.perf_counter() - t,
            0.0,
            zmax(s, G),
        )

    print("\nJAX / numpy (draws/s ratio):")
    rate = {r["case"]: r["draws_per_s"] for r in rows}
    ratios = {}
    for name in ("all-4", *WORKFLOWS):
        ratios[name] = rate[f"jax {name}"] / rate[f"numpy {name}"]
        print(f"  {name:<26} {ratios[name]:.2f}x")
    if args.workers > 1:
        name = f"all-4 ({args.workers} workers)"
        ratios[name] = rate[f"jax {name}"] / rate["numpy all-4"]
        print(f"  {name:<26} {ratios[name]:.2f}x  (numpy: one process)")

    print("\nexact (covariance propagation) vs explicit linear map:")
    exact = {}
    for g in (G, 1000):
        t = time.perf_counter()
        cs = {w: limit_exact(w, g) for w in WORKFLOWS}
        t_prop = time.perf_counter() - t
        t = time.perf_counter()
        ls = {w: exact_linear_map(w, g) for w in WORKFLOWS}
        t_map = time.perf_counter() - t
        diff = max(float(np.abs(cs[w] - ls[w]).max()) for w in WORKFLOWS)
        exact[g] = {
            "propagation_s": t_prop,
            "linear_map_s": t_map,
            "max_abs_diff": diff,
            "ratio_at_G": {w: float(cs[w][-1, -1]) for w in WORKFLOWS},
        }
        print(
            f"  G={g:<5} propagation {t_prop * 1e3:8.1f} ms   linear map {t_map * 1e3:8.1f} ms   "
            f"max |diff| {diff:.1e}   ratios at G: "
            + ", ".join(f"{w} {v:.6f}" for w, v in exact[g]["ratio_at_G"].items())
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "rows": rows,
                    "jax_over_numpy": ratios,
                    "exact": exact,
                    "load_average": os.getloadavg(),
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
