"""Parameterisations: adapters that turn trained networks into denoisers.

Every denoiser in jaxdiff works in the variance-exploding coordinates of Karras et al. 2022 (EDM),
``x = x0 + sigma * noise``, and returns ``D(x, sigma, cond) ~= E[x0 | x]``. A network trained in
another parameterisation is wrapped once by one of the adapters below; samplers and guidance never
need to know which. Each adapter is a frozen pytree dataclass: its network (a pytree callable such
as :class:`jaxdiff.models._pure.PureModel` or ``jax.tree_util.Partial(apply, params)``) and its
schedule arrays are traced leaves, its configuration is static.

Variance-preserving networks see ``x_vp = x / sqrt(1 + sigma^2)``, because ``x_vp = sqrt(abar) x0 +
sqrt(1 - abar) eps`` with ``sigma^2 = (1 - abar) / abar`` (Song et al. 2021, eq. 29; Karras et al.
2022, Table 1).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff._util import batch_sigma, expand_to
from jaxdiff.schedules import vp_sigmas

Array = jax.Array
PREDICTIONS = ("epsilon", "v_prediction", "sample", "score")


class Denoiser(Protocol):
    """``D(x, sigma, cond) -> x0_hat`` with ``x = x0 + sigma * noise``; sigma scalar or (B,)."""

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array: ...


def _check_prediction(prediction: str, allowed: tuple[str, ...] = PREDICTIONS) -> None:
    if prediction not in allowed:
        raise ValueError(f"unknown prediction type {prediction!r}; valid: {', '.join(allowed)}")


def vp_output_to_x0(out: Array, x: Array, sigma: Array, prediction: str) -> Array:
    """Map a VP network's output at ``x_vp = x / sqrt(1 + sigma^2)`` to the x0 estimate.

    epsilon: ``x0 = x - sigma eps``; v (Salimans & Ho 2022, ``v = a eps - s x0``):
    ``x0 = a x_vp - s v`` with ``a = 1/sqrt(1+sigma^2)``, ``s = sigma a``; sample: ``x0 = out``;
    score (of ``x_vp``): ``eps = -s * score``.
    """
    s = expand_to(sigma, x)
    a = jax.lax.rsqrt(1.0 + s * s)
    if prediction == "epsilon":
        return x - s * out
    if prediction == "v_prediction":
        return a * a * x - s * a * out
    if prediction == "sample":
        return out
    if prediction == "score":
        return x + s * (s * a) * out
    raise ValueError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def split_variance(out: Array, x: Array) -> tuple[Array, Array | None]:
    """A denoiser output split into the data estimate (``x``'s channels) and the learned-variance channels after
    them (None when there are none). See :class:`DiscreteVPDenoiser` ``learned_variance``."""
    c = x.shape[-1]
    if out.shape[-1] == c:
        return out, None
    return out[..., :c], out[..., c:]


def join_variance(x0: Array, variance: Array | None) -> Array:
    """The inverse of :func:`split_variance`."""
    return x0 if variance is None else jnp.concatenate([x0, variance], axis=-1)


def sigma_to_discrete_t(sigma: Array, sigmas_train: Array) -> Array:
    """Invert the training discretisation ``t -> sigmas_train[t]`` (piecewise linear in t).

    This is the inverse of the linear interpolation the reference schedulers use for fractional
    timesteps, so ``sigma_to_discrete_t(sigmas_train[t]) == t`` and fractional t round-trip too.
    """
    t = jnp.arange(sigmas_train.shape[0], dtype=sigma.dtype)
    return jnp.interp(sigma, sigmas_train.astype(sigma.dtype), t)


@pytree_dataclass
class DiscreteVPDenoiser:
    """A network trained on a discrete VP schedule (DDPM, Stable Diffusion): ``net(x_vp, t, cond)``.

    ``alphas_cumprod`` is the training schedule's cumulative product (T,). ``sigma`` is mapped to the
    (fractional) training step ``t``; ``quantize`` rounds it to the nearest integer step.

    ``learned_variance``: the network outputs ``2C`` channels, the prediction then the variance interpolation
    ``v`` in [-1, 1] of Nichol & Dhariwal 2021 (eq. 15: ``log var = (v+1)/2 log beta + (1-v)/2 log beta_tilde``;
    GLIDE, DeepFloyd IF, unCLIP, DiT; diffusers' ``variance_type="learned_range"``). The denoiser then returns
    the data estimate with ``v`` appended unchanged (``2C`` channels): :class:`jaxdiff.samplers.DDPM`
    ``(variance="learned_range")`` reads it, :class:`jaxdiff.guidance.ClassifierFree` and the thresholds act on
    the estimate only, and :class:`DropVariance` hands any other sampler the estimate alone.
    """

    net: Callable[..., Array]
    alphas_cumprod: Array
    prediction: str = static_field(default="epsilon")
    quantize: bool = static_field(default=False)
    learned_variance: bool = static_field(default=False)

    def __post_init__(self) -> None:
        _check_prediction(self.prediction)

    @property
    def sigmas_train(self) -> Array:
        return vp_sigmas(jnp.asarray(self.alphas_cumprod))

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        sigma = batch_sigma(sigma, x)
        t = sigma_to_discrete_t(sigma, self.sigmas_train)
        if self.quantize:
            t = jnp.round(t)
        out = self.net(x * expand_to(jax.lax.rsqrt(1.0 + sigma * sigma), x), t, cond)
        if not self.learned_variance:
            return vp_output_to_x0(out, x, sigma, self.prediction)
        if out.shape[-1] != 2 * x.shape[-1]:
            raise ValueError(f"learned_variance=True needs a network with twice the input's {x.shape[-1]} channels "
                             f"(prediction, then variance), got {out.shape[-1]}; set learned_variance=False")
        pred, v = split_variance(out, x)
        return join_variance(vp_output_to_x0(pred, x, sigma, self.prediction), v)


@pytree_dataclass
class DropVariance:
    """A learned-variance denoiser's data estimate alone (its first ``C`` channels), for samplers that do not read
    the variance (everything but ``DDPM(variance="learned_range")``), as diffusers' pipelines drop it for them."""

    inner: Callable[..., Array]

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        return split_variance(self.inner(x, sigma, cond), x)[0]


@pytree_dataclass
class ContinuousVPDenoiser:
    """A network of the VP SDE with linear beta(t) (Song et al. 2021, eq. 11, 32): ``net(x_vp, t * time_scale, cond)``.

    ``abar(t) = exp(-t^2 (beta_max - beta_min) / 2 - t beta_min)``; inverting
    ``log(1 + sigma^2) = t^2 (beta_max - beta_min) / 2 + t beta_min`` gives t. score_sde's DDPM++
    networks use ``time_scale = 999``.
    """

    net: Callable[..., Array]
    beta_min: float = 0.1
    beta_max: float = 20.0
    prediction: str = static_field(default="score")
    time_scale: float = static_field(default=999.0)

    def __post_init__(self) -> None:
        _check_prediction(self.prediction)

    def t_of_sigma(self, sigma: Array) -> Array:
        d = self.beta_max - self.beta_min
        return (jnp.sqrt(self.beta_min**2 + 2.0 * d * jnp.log1p(sigma * sigma)) - self.beta_min) / d

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        sigma = batch_sigma(sigma, x)
        t = self.t_of_sigma(sigma)
        out = self.net(x * expand_to(jax.lax.rsqrt(1.0 + sigma * sigma), x), t * self.time_scale, cond)
        return vp_output_to_x0(out, x, sigma, self.prediction)


@pytree_dataclass
class VEDenoiser:
    """A variance-exploding network (NCSN, Song & Ermon 2019; score_sde VE): ``net(x, c_noise, cond)``.

    ``prediction="score"``: the net returns ``grad log p_sigma(x)`` and Tweedie's formula gives
    ``x0 = x + sigma^2 score``; ``"epsilon"``: ``x0 = x - sigma eps``; ``"sample"``: x0 directly.
    ``noise_input`` chooses ``c_noise``: ``"sigma"`` or ``"log_sigma"``.
    """

    net: Callable[..., Array]
    prediction: str = static_field(default="score")
    noise_input: str = static_field(default="sigma")

    def __post_init__(self) -> None:
        _check_prediction(self.prediction, ("score", "epsilon", "sample"))
        if self.noise_input not in ("sigma", "log_sigma"):
            raise ValueError(f"noise_input must be 'sigma' or 'log_sigma', got {self.noise_input!r}")

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        sigma = batch_sigma(sigma, x)
        c_noise = jnp.log(sigma) if self.noise_input == "log_sigma" else sigma
        out = self.net(x, c_noise, cond)
        s = expand_to(sigma, x)
        if self.prediction == "score":
            return x + s * s * out
        if self.prediction == "epsilon":
            return x - s * out
        return out


@pytree_dataclass
class EDMDenoiser:
    """EDM preconditioning (Karras et al. 2022, Table 1 and eq. 7).

    ``D(x) = c_skip x + c_out F(c_in x, c_noise)`` with ``c_skip = sd^2 / (s^2 + sd^2)``,
    ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``, ``c_noise = log(s) / 4``.
    """

    net: Callable[..., Array]
    sigma_data: float = 0.5

    def __call__(self, x: Array, sigma: Array, cond: Any = None) -> Array:
        sigma = batch_sigma(sigma, x)
        sd2 = self.sigma_data**2
        s = expand_to(sigma, x)
        c_skip = sd2 / (s * s + sd2)
        c_out = s * self.sigma_data * jax.lax.rsqrt(s * s + sd2)
        c_in = jax.lax.rsqrt(s * s + sd2)
        return c_skip * x + c_out * self.net(c_in * x, jnp.log(sigma) / 4.0, cond)

    @staticmethod
    def training_target(x0: Array, noise: Array, sigma: Array, sigma_data: float = 0.5) -> Array:
        """The network target ``F`` (EDM eq. 8) for ``x = x0 + sigma * noise``."""
        s = expand_to(sigma, x0)
        sd2 = sigma_data**2
        c_skip = sd2 / (s * s + sd2)
        c_out = s * sigma_data * jax.lax.rsqrt(s * s + sd2)
        return (x0 - c_skip * (x0 + s * noise)) / c_out


# ---- noisy classifiers: the same input maps, for classifier guidance (Dhariwal & Nichol 2021) ----------

@pytree_dataclass
class DiscreteVPClassifier:
    """A classifier of VP inputs at training step t: ``net(x / sqrt(1 + sigma^2), t) -> logits``."""

    net: Callable[..., Array]
    alphas_cumprod: Array

    def __call__(self, x: Array, sigma: Array) -> Array:
        sigma = batch_sigma(sigma, x)
        t = sigma_to_discrete_t(sigma, vp_sigmas(jnp.asarray(self.alphas_cumprod, sigma.dtype)))
        return self.net(x * expand_to(jax.lax.rsqrt(1.0 + sigma * sigma), x), t)


@pytree_dataclass
class EDMClassifier:
    """A classifier with EDM input scaling: ``net(x / sqrt(sigma^2 + sd^2), log(sigma) / 4) -> logits``."""

    net: Callable[..., Array]
    sigma_data: float = 0.5

    def __call__(self, x: Array, sigma: Array) -> Array:
        sigma = batch_sigma(sigma, x)
        c_in = jax.lax.rsqrt(sigma * sigma + self.sigma_data**2)
        return self.net(x * expand_to(c_in, x), jnp.log(sigma) / 4.0)


def to_epsilon(x: Array, x0: Array, sigma: Array) -> Array:
    """The noise estimate a denoiser implies: ``eps = (x - x0) / sigma``."""
    return (x - x0) / expand_to(batch_sigma(sigma, x), x)


def to_score(x: Array, x0: Array, sigma: Array) -> Array:
    """Tweedie: ``grad log p_sigma(x) = (x0 - x) / sigma^2``."""
    s = expand_to(batch_sigma(sigma, x), x)
    return (x0 - x) / (s * s)
