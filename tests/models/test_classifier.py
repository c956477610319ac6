"""jaxdiff.models.classifier: the network behind the built-in digit classifiers."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff import builtin
from jaxdiff.models.classifier import DigitClassifier, DigitClassifierConfig


def test_builtin_classifiers_are_the_models_network():
    for name in builtin.BUILTIN_CLASSIFIERS:
        net = builtin.build_network(builtin.builtin_config(name)["network"])
        assert type(net) is DigitClassifier


def test_shapes_and_time_conditioning():
    cfg = DigitClassifierConfig(block_out_channels=(8, 16), hidden=12, num_classes=5, norm_num_groups=4,
                                time_conditioned=True)
    net = DigitClassifier(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 8, 1)), jnp.float32)
    assert net(x, jnp.arange(3.0)).shape == (3, 5) and net.features(x, 1.0).shape == (3, 12)
    # the timestep reaches the logits: a conditioned classifier differs between two timesteps
    assert not np.allclose(net(x, 0.0), net(x, 500.0))
    with pytest.raises(ValueError, match="pass the timesteps t"):
        net(x)
    with pytest.raises(ValueError, match="NHWC with 1 channel"):
        net(jnp.zeros((3, 1, 8, 8)))
