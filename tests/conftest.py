"""Hardens JAX for the whole suite (as equinox does) and fixes float64 on."""

import os

# Tests are CPU-only and must not grab every core's worth of threads twice over.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
