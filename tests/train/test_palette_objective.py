"""Palette's objectives against diffusers' UNet2DModel fed the concatenated tensor, and a few steps of learning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff import losses as L
from jaxdiff import schedules
from jaxdiff.conditioning import Concat
from jaxdiff.data.degradations import task_pairs
from jaxdiff.denoisers import DiscreteVPDenoiser
from jaxdiff.models import unet2d
from jaxdiff.models._pure import PureModel
from jaxdiff.train import ArrayDataset, OptimizerConfig, Trainer, load_digits_dataset
from jaxdiff.train.palette import PaletteObjective, RegressionObjective

CONFIG = dict(sample_size=8, in_channels=2, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=8, norm_num_groups=4)
AC = np.asarray(schedules.alphas_cumprod(schedules.vp_betas("squaredcos_cap_v2", 1000)), np.float32)


@pytest.fixture(scope="module")
def tiny():
    """A random diffusers UNet2DModel with two input channels and the same weights in jaxdiff."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**CONFIG).eval()
    with torch.no_grad():  # zero-initialised layers would hide wiring errors: randomise everything
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ours = PureModel.of(unet2d.from_pretrained_tensors({"_class_name": "UNet2DModel", **CONFIG}, tensors))
    return torch, ref, ours


def torch_eps(tiny, x, t):
    torch, ref, _ = tiny
    with torch.no_grad():
        out = ref(torch.from_numpy(np.transpose(x, (0, 3, 1, 2))), torch.from_numpy(t)).sample
    return np.transpose(out.numpy(), (0, 2, 3, 1))


def batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32), rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
            rng.standard_normal((n, 8, 8, 1)).astype(np.float32))


def test_concat_network_equals_diffusers_on_the_concatenated_tensor(tiny):
    x, src, _ = batch()
    t = np.array([3.0, 250.0, 600.0, 999.0], np.float32)
    ours = np.asarray(Concat(tiny[2], jnp.asarray(src))(jnp.asarray(x), jnp.asarray(t)))
    ref = torch_eps(tiny, np.concatenate([x, src], -1), t)  # noisy sample first, source second (diffusers' order)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_palette_loss_is_the_epsilon_error_of_the_concat_network(tiny, norm):
    """Palette eq. 1 computed from diffusers' output: ``||eps(concat(sqrt(a) y + sqrt(1-a) eps, src), t) - eps||_p``."""
    x0, src, noise = batch(seed=1)
    t = np.array([10, 200, 500, 900])
    a = AC[t][:, None, None, None]
    eps_hat = torch_eps(tiny, np.concatenate([np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, src], -1), t.astype(np.float32))
    err = eps_hat - noise
    expected = np.mean(err ** 2 if norm == "l2" else np.abs(err), axis=(1, 2, 3))
    obj = PaletteObjective(L.DiscreteVPLevels(jnp.asarray(AC)), DiscreteVPDenoiser(None, jnp.asarray(AC)), norm)
    sigma = np.sqrt((1 - AC[t]) / AC[t])
    ours = obj.at(tiny[2], jnp.asarray(x0), jnp.asarray(src), jnp.asarray(sigma), jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=2e-3, atol=1e-5)


def test_regression_loss_reads_only_the_source(tiny):
    x0, src, _ = batch(seed=2)
    pred = torch_eps(tiny, np.concatenate([np.zeros_like(src), src], -1), np.zeros(4, np.float32))
    ours, _ = RegressionObjective()(tiny[2], {"x": jnp.asarray(x0), "source": jnp.asarray(src)}, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(ours), np.mean((pred - x0) ** 2, axis=(1, 2, 3)), rtol=1e-3, atol=1e-6)


def test_bad_norm_is_refused():
    with pytest.raises(ValueError, match="norm must be"):
        PaletteObjective(L.DiscreteVPLevels(jnp.asarray(AC)), DiscreteVPDenoiser(None, jnp.asarray(AC)), "l3")


class TinyConcatNet(nnx.Module):
    """``net(concat([x, source]), t)``: two convolutions and a timestep bias (compiles fast; the U-Net wiring is
    checked against diffusers above)."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(2, 16, (3, 3), rngs=rngs)
        self.time = nnx.Linear(1, 16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 1, (3, 3), rngs=rngs)

    def __call__(self, x, t, cond=None):
        h = self.conv1(x) + self.time(jnp.reshape(t / 1000.0, (-1, 1)))[:, None, None]
        return self.conv2(jax.nn.silu(h))


@pytest.mark.parametrize("which", ["diffusion", "regression"])
def test_a_few_train_steps_lower_the_loss_on_digit_pairs(which):
    pairs = task_pairs(load_digits_dataset()[0]["x"][:256], 1, seed=0)
    data = ArrayDataset({"x": pairs["x"], "source": pairs["source"]}, batch_size=64, seed=0)
    ac = jnp.asarray(AC)
    obj = (PaletteObjective(L.DiscreteVPLevels(ac), DiscreteVPDenoiser(None, ac)) if which == "diffusion"
           else RegressionObjective())
    net = TinyConcatNet(nnx.Rngs(0))
    opt = OptimizerConfig(3e-3, warmup_steps=0, total_steps=40)
    trainer, state = Trainer.create(net, obj, opt, sample_shape=(8, 8, 1))
    fixed = {k: jnp.asarray(v) for k, v in data.batch(0).items()}
    key = jax.random.key(123)  # the same noise levels and noise before and after

    def loss(s):
        return float(jnp.mean(obj(trainer.model(s, ema=False), fixed, key)[0]))

    before = loss(state)
    for i in range(40):
        state, _ = trainer.step(state, data.batch(i))
    assert loss(state) < 0.8 * before
