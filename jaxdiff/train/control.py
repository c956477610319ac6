"""Training a side network (ControlNet, T2I-Adapter) beside a frozen text-to-image U-Net.

ControlNet (Zhang et al. 2023, eq. 1) and T2I-Adapter (Mou et al. 2023, eq. 4) keep the base model's
denoising loss, ``E ||eps - eps_theta(z_t, t, c_text, c_control)||^2``, and train only the side network:
the base U-Net sits in the objective as a pytree (traced, never differentiated), the trained network
reaches it as :class:`jaxdiff.conditioning.Residuals` (a ControlNet's skip and mid residuals, an
adapter's intra-block features). Both papers drop the caption for the empty prompt during training
(ControlNet: half the captions) so the side network learns to read the control image on its own.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff.conditioning import Residuals
from jaxdiff.losses import DenoisingLoss
from jaxdiff.train.objectives import _check_template, _with_net, drop_context

Array = jax.Array
SIDES = ("controlnet", "adapter")


@pytree_dataclass
class ControlledNet:
    """``net(x, t, {"context", "control"})``: the frozen ``base`` U-Net given ``side``'s residuals.

    ``side`` is ``"controlnet"`` (``side(x, t, context, control) -> Residuals``, a ``ControlNetModel``) or
    ``"adapter"`` (``side(control) -> features``, a ``T2IAdapter``: they enter as intra-block residuals).
    """

    base: Callable[..., Array]
    side_net: Callable[..., Any]
    side: str = static_field(default="controlnet")

    def __call__(self, x: Array, t: Array, cond: Mapping[str, Any]) -> Array:
        context, image = cond["context"], cond["control"]
        if self.side == "controlnet":
            residuals = self.side_net(x, t, context, image)
        else:
            residuals = Residuals(intra=tuple(self.side_net(image)))
        return self.base(x, t, context, residuals=residuals)


@pytree_dataclass
class ControlObjective:
    """The base model's denoising loss with a side network trained beside it (module docstring).

    ``loss(denoiser, batch["x"], key, {"context", "control"})`` through ``denoiser`` (an adapter with
    ``net=None``, e.g. ``DiscreteVPDenoiser(None, alphas_cumprod)``) around :class:`ControlledNet`.
    ``base``: the frozen U-Net (a ``PureModel``); ``null_context`` (L, D): the empty prompt's states, which
    replace a caption with probability ``context_dropout`` (ControlNet: 0.5). Batches carry ``"x"`` (scaled
    latents), ``"context"`` (B, L, D) and ``"control"`` (B, H, W, c) control images in [0, 1].
    """

    loss: DenoisingLoss
    denoiser: Any
    base: Any
    null_context: Array
    context_dropout: float = 0.5
    side: str = static_field(default="controlnet")

    needs_labels = False
    batch_keys = ("x", "context", "control")

    def __post_init__(self) -> None:
        _check_template(self.denoiser, "denoiser")
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")
        p = self.context_dropout
        if isinstance(p, (int, float)) and not 0 <= p < 1:
            raise ValueError(f"context_dropout must be a probability in [0, 1), got {p}")

    def network(self, side_net: Callable[..., Any]) -> ControlledNet:
        """The controlled U-Net around a side network."""
        return ControlledNet(self.base, side_net, self.side)

    def denoiser_for(self, side_net: Callable[..., Any]) -> Any:
        """The sampler's denoiser: the template adapter around the controlled U-Net (cond: context and control)."""
        return _with_net(self.denoiser, self.network(side_net))

    def __call__(self, net: Callable[..., Any], batch: dict, key: Array) -> tuple[Array, dict]:
        k_loss, k_drop = jax.random.split(key)
        context = drop_context(batch["context"], self.null_context, k_drop, self.context_dropout)
        cond = {"context": context, "control": batch["control"]}
        return self.loss(self.denoiser_for(net), batch["x"], k_loss, cond), {}
