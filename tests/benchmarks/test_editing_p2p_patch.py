"""benchmarks/_editing_p2p.ContextPatch: the diagnostic of where the U-Net reads a word replaces the text states at the
chosen positions of the conditional rows only, and leaves every other state as it was."""
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._editing_p2p import ContextPatch
from jaxdiff import conditioning


def seen_context(x, t, cond):
    """A network that returns the context it was handed."""
    return cond["context"]


def test_only_the_chosen_positions_of_the_conditional_rows_change():
    ctx = jax.random.normal(jax.random.key(0), (4, 6, 3))
    donor = jax.random.normal(jax.random.key(1), (6, 3))
    at = np.array([0, 0, 1, 0, 1, 0], np.float32)
    patched = conditioning.apply(seen_context, conditioning.Transform(ContextPatch, dict(positions=at, states=donor)))
    flag = jnp.array([1.0, 0.0, 1.0, 0.0])  # rows 0 and 2 conditional, as classifier-free guidance batches them
    out = np.asarray(patched(jnp.zeros((4, 2, 2, 1)), jnp.zeros(4), {"context": ctx, "conditional": flag}))
    for row in range(4):
        for pos in range(6):
            want = donor[pos] if flag[row] and at[pos] else ctx[row, pos]
            np.testing.assert_array_equal(out[row, pos], np.asarray(want))
