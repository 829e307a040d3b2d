"""Figures of a sweep's results (``collapse-jax plot DIR``).

For each combination of the parameters that vary in the sweep other than the
facet and colour keys, two figures -- the variance ratio and the mean squared
error E||theta_g - theta0||^2 against generation -- with one panel per
(n, d) (rows n, columns d; where only one of them varies, sigma takes the
other place), one colour per workflow, 95% bands, and the closed forms where
they are exact (least squares):

- variance ratio: g for discard (any design); sum_{k<=g} 1/k^2 for augment
  with a fixed design (Gerstgrasser et al. 2024);
- MSE: sigma^2 tr(Sigma^{-1}) / (n - d - 1) times the same factor, for
  Gaussian features drawn once per trajectory (fixed design) or every
  generation (discard only); tr(Sigma^{-1}) = d for isotropic features, which
  gives Gerstgrasser et al.'s sigma^2 d / (n - d - 1).

Figures are written to DIR/plots/<metric>[__key=value...].{png,pdf}.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ._driver import SUMMARY_COLUMNS
from ._io import atomic_write_bytes
from ._statistics import Z95

COLORS = {"discard": "tab:red", "augment": "tab:blue", "subsample": "tab:green",
          "subsample-replace": "tab:purple"}
_ORDER = tuple(COLORS)
# Config keys that never split figures: they change no expected value.
_IGNORED = ("trajectories", "block_size", "draw", "sigma")


def harmonic2(g: np.ndarray) -> np.ndarray:
    """sum_{k<=g} 1/k^2 for g = 1, 2, ... (shape of `g`)."""
    return np.cumsum(1.0 / np.arange(1, int(np.max(g)) + 1) ** 2)[np.asarray(g) - 1]


def theory(config: dict[str, Any], metric: str, g: np.ndarray) -> np.ndarray | None:
    """The closed form of `metric` at generations `g` for this cell's config, or None.

    Least squares: discard (any design) and augment (fixed design).
    ``variance_ratio``: g or sum_{k<=g} 1/k^2.  ``mse``: that factor times
    sigma^2 tr(Sigma^{-1}) / (n - d - 1), the expected E||theta_1 - theta0||^2
    for Gaussian features with covariance Sigma (inverse-Wishart mean).
    Gaussian fitting under discard: both, exactly at finite n
    (`collapse_jax._theory.gaussian_discard_exact`).  Median under discard:
    the variance ratio g (i.i.d. increments).
    """
    if config["model"] == "gaussian" and config["workflow"] == "discard":
        from ._theory import gaussian_discard_exact

        d = config["d"]
        cov = np.eye(d) if config.get("feature_cov") is None else np.asarray(config["feature_cov"])
        ex = gaussian_discard_exact(config["n"], int(np.max(g)), config["sigma"] ** 2 * cov)
        values = ex.variance_ratio if metric == "variance_ratio" else ex.cov_trace
        return values[np.asarray(g) - 1]
    median_discard = config["model"] == "median" and config["workflow"] == "discard"
    if median_discard and metric == "variance_ratio":
        return g.astype(np.float64)
    if config["model"] != "ols":
        return None
    if config["workflow"] == "discard":
        factor = g.astype(np.float64)
    elif config["workflow"] == "augment" and config["design"] == "fixed":
        factor = harmonic2(g)
    else:
        return None
    if metric == "variance_ratio":
        return factor
    n, d = config["n"], config["d"]
    cov = config.get("feature_cov")
    if cov is None:
        tr_inv = float(d)
    else:
        tr_inv = float(np.trace(np.linalg.inv(np.asarray(cov, np.float64))))
    return config["sigma"] ** 2 * tr_inv / (n - d - 1) * factor


def _key(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _noise(rec: dict[str, Any]) -> tuple[str, Any]:
    """('sigma2', value as written) or ('sigma', value)."""
    if "sigma2" in rec["params"]:
        return "sigma2", rec["params"]["sigma2"]
    return "sigma", rec["config"]["sigma"]


_LABELS = {"sigma2": "σ²", "sigma": "σ"}


def _label(key: str, value: Any) -> str:
    return f"{_LABELS.get(key, key)} = {_fmt(value)}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s)


def _layout(records: list[dict[str, Any]]) -> tuple[str | None, str | None, list[str]]:
    """(row key, column key, keys that split figures) from what varies."""
    keys = sorted({k for r in records for k in r["config"]} - {"workflow", *_IGNORED})
    values = {k: {_key(r["config"].get(k)) for r in records} for k in keys}
    values["noise"] = {_key(_noise(r)[1]) for r in records}
    varies = [k for k in ("n", "d", "noise") if len(values[k]) > 1]
    if "n" in varies and "d" in varies:
        rows, cols = "n", "d"
    elif len(varies) >= 2:
        rows, cols = varies[0], varies[1]
    elif varies:
        rows, cols = None, varies[0]
    else:
        rows, cols = None, None
    split = [k for k in keys + ["noise"] if len(values[k]) > 1 and k not in (rows, cols)]
    return rows, cols, split


def _value(rec: dict[str, Any], key: str) -> Any:
    return _key(_noise(rec)[1]) if key == "noise" else _key(rec["config"].get(key))


def _sort(vals) -> list:
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def _facet_label(recs: list[dict[str, Any]], key: str | None, value: Any) -> str:
    if key is None:
        return ""
    if key == "noise":
        return _label(_noise(recs[0])[0], value)
    return _label(key, value)


def _draw(records, metric: str, rows: str | None, cols: str | None, title: str):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    row_vals = _sort({_value(r, rows) for r in records}) if rows else [None]
    col_vals = _sort({_value(r, cols) for r in records}) if cols else [None]
    nr, nc = len(row_vals), len(col_vals)
    fig = Figure(figsize=(1.0 + 2.9 * nc, 1.3 + 2.25 * nr), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nr, nc, sharex=True, sharey=True, squeeze=False))
    ci = SUMMARY_COLUMNS.index
    workflows_seen: list[str] = []
    any_theory = False
    for i, rv in enumerate(row_vals):
        for j, cv in enumerate(col_vals):
            ax = axes[i, j]
            here = [r for r in records
                    if (rows is None or _value(r, rows) == rv)
                    and (cols is None or _value(r, cols) == cv)]
            labels = (_facet_label(records, rows, rv), _facet_label(records, cols, cv))
            label = ", ".join(s for s in labels if s)
            if not here:
                ax.set_title(label, fontsize=9, color="0.5")
                where = {k: v for k, v in ((rows, rv), (cols, cv)) if k in ("n", "d")}
                ols = all(r["config"]["model"] == "ols" for r in records)
                if ols and len(where) == 2 and where["n"] < where["d"] + 2:
                    why = "n < d + 2: least squares\nhas no finite variance"
                else:
                    why = "no cell\n(skipped or not run yet)"
                ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes,
                        fontsize=8, color="0.5")
                ax.tick_params(labelsize=8)
                continue
            here.sort(key=lambda r: _ORDER.index(r["config"]["workflow"])
                      if r["config"]["workflow"] in _ORDER else 99)
            for r in here:
                w = r["config"]["workflow"]
                if w not in workflows_seen:
                    workflows_seen.append(w)
                color = COLORS.get(w, "0.3")
                a = np.asarray([[np.nan if v is None else v for v in row] for row in r["rows"]],
                               np.float64)
                g = a[:, ci("generation")].astype(np.int64)
                if metric == "variance_ratio":
                    y, lo, hi = a[:, ci("variance_ratio")], a[:, ci("ci_low")], a[:, ci("ci_high")]
                else:
                    y = a[:, ci("mse")]
                    lo, hi = y - Z95 * a[:, ci("mse_se")], y + Z95 * a[:, ci("mse_se")]
                exact = theory(r["config"], metric, g)
                if exact is not None:
                    any_theory = True
                    ax.plot(g, exact, color="k", lw=0.9, ls=(0, (4, 2)), zorder=4)
                positive = np.isfinite(lo) & (lo > 0)
                ax.fill_between(g, np.where(positive, lo, y), hi, color=color, alpha=0.18, lw=0,
                                zorder=2)
                ax.plot(g, y, color=color, lw=1.1, zorder=3)
            ax.set_title(label, fontsize=9)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, lw=0.5, which="major")
            ax.tick_params(labelsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("generation $g$", fontsize=9)
    ylabel = (r"variance ratio $\mathrm{tr\,Cov}(\theta_g)/\mathrm{tr\,Cov}(\theta_1)$"
              if metric == "variance_ratio" else r"MSE $E\|\theta_g-\theta_0\|^2$")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    handles = [Line2D([], [], color=COLORS.get(w, "0.3"), lw=1.5, label=w) for w in workflows_seen]
    handles.append(Patch(color="0.5", alpha=0.3, lw=0, label="95% interval"))
    if any_theory:
        handles.append(Line2D([], [], color="k", lw=0.9, ls=(0, (4, 2)),
                              label="closed form (exact)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9,
               frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_sweep(out: str | Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Draw every figure for the sweep in `out`; returns the files written."""
    from ._sweep import read_records

    out = Path(out)
    records = read_records(out / "results.jsonl")
    if not records:
        raise ValueError(f"{out}: no finished cells in results.jsonl")
    name = ""
    meta = out / "sweep.json"
    if meta.exists():
        name = json.loads(meta.read_text()).get("sweep", {}).get("name", "")
    rows, cols, split = _layout(records)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(_value(r, k) for k in split), []).append(r)
    written = []
    for combo in _sort(groups):
        recs = groups[combo]
        first = recs[0]
        parts = [_facet_label(recs, k, v) for k, v in zip(split, combo)]
        fixed = [_label(k, first["config"][k]) for k in ("model", "design")
                 if k not in split and k not in (rows, cols)]
        if "noise" not in split and "noise" not in (rows, cols):
            fixed.append(_label(*_noise(first)))
        traj = sorted({r["trajectories"] for r in recs})
        rtext = f"{traj[0]:,}" if len(traj) == 1 else f"{traj[0]:,}-{traj[-1]:,}"
        noise_name = "sigma2" if "sigma2" in first["params"] else "sigma"
        stem = "".join(f"__{noise_name if k == 'noise' else k}={_fmt(v)}"
                       for k, v in zip(split, combo))
        for metric in ("variance_ratio", "mse"):
            what = "variance ratio" if metric == "variance_ratio" else "mean squared error"
            bits = [name, what, *parts, *fixed, f"{rtext} trajectories per cell"]
            title = " | ".join(s for s in bits if s)
            fig = _draw(recs, metric, rows, cols, title)
            for fmt in formats:
                buf = io.BytesIO()
                fig.savefig(buf, format=fmt, dpi=130 if fmt == "png" else None)
                path = out / "plots" / f"{metric}{_slug(stem)}.{fmt}"
                atomic_write_bytes(path, buf.getvalue())
                written.append(path)
    return written


__all__ = ["harmonic2", "plot_sweep", "theory"]
