"""Pruning methods, one module each (see METHODS.md for the conventions each one follows)."""

from prospr_jax.methods.snip import snip_scores

__all__ = ["snip_scores"]
