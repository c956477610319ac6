"""jaxdiff: diffusion models as composable pure JAX functions."""
__version__ = "0.1.0"
