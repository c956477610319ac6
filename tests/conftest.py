"""Shared test settings: float32 everywhere, strict errors for NaN debugging off by default."""
import jax

jax.config.update("jax_default_matmul_precision", "highest")
