"""What a train step minimises: a per-sample loss of (network, batch, key).

An objective holds a *template* adapter (a denoiser or classifier dataclass whose ``net`` is None);
the step fills in the network being trained, so the loss runs through exactly the adapter the sampler
will use afterwards (:meth:`DiffusionObjective.denoiser`). Batches are dicts: ``"x"`` (B, ...)
float samples and, for conditional models and classifiers, ``"label"`` (B,) integers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, replace, static_field
from jaxdiff.losses import DenoisingLoss, NoisyClassifierLoss

Array = jax.Array


def drop_labels(labels: Array, key: Array, p: Array | float, null_label: int) -> Array:
    """Classifier-free guidance training (Ho & Salimans 2022): each label becomes ``null_label`` with probability p."""
    drop = jax.random.bernoulli(key, jnp.asarray(p, jnp.float32), labels.shape)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def _with_net(template: Any, net: Callable[..., Array]) -> Any:
    return net if template is None else replace(template, net=net)


def _check_template(template: Any, what: str) -> None:
    if template is None:
        return
    if not dataclasses.is_dataclass(template) or "net" not in {f.name for f in dataclasses.fields(template)}:
        raise TypeError(f"the {what} must be an adapter dataclass with a `net` field (e.g. "
                        f"EDMDenoiser(net=None)), got {type(template).__name__}")


@pytree_dataclass
class DiffusionObjective:
    """A denoising loss through ``denoiser`` (an adapter with ``net=None``), optionally class-conditional.

    ``conditional``: pass ``batch["label"]`` as ``cond``; ``label_dropout`` (a traced leaf) replaces it
    by ``null_label`` with that probability for classifier-free guidance.
    """

    loss: DenoisingLoss
    denoiser: Any
    label_dropout: float = 0.0
    conditional: bool = static_field(default=False)
    null_label: int | None = static_field(default=None)

    def __post_init__(self) -> None:
        _check_template(self.denoiser, "denoiser")
        p = self.label_dropout
        if isinstance(p, (int, float)) and p > 0:  # checked when built, not when traced
            if not self.conditional:
                raise ValueError("label_dropout only applies to a conditional objective; pass conditional=True")
            if self.null_label is None:
                raise ValueError("label_dropout needs a `null_label` (the class id meaning 'no label', "
                                 "usually num_classes)")
            if p >= 1:
                raise ValueError(f"label_dropout must be a probability below 1, got {p}")

    @property
    def needs_labels(self) -> bool:
        return self.conditional

    def denoiser_for(self, net: Callable[..., Array]) -> Any:
        """The sampler's denoiser: the template adapter around ``net``."""
        return _with_net(self.denoiser, net)

    def __call__(self, net: Callable[..., Array], batch: dict, key: Array) -> tuple[Array, dict]:
        k_loss, k_drop = jax.random.split(key)
        cond = None
        if self.conditional:
            cond = batch["label"]
            if self.null_label is not None:
                cond = drop_labels(cond, k_drop, self.label_dropout, self.null_label)
        return self.loss(self.denoiser_for(net), batch["x"], k_loss, cond), {}


@pytree_dataclass
class ClassifierObjective:
    """Cross-entropy of a noisy classifier (for classifier guidance, Dhariwal & Nichol 2021).

    ``classifier`` is an adapter of :mod:`jaxdiff.denoisers` with ``net=None`` (``DiscreteVPClassifier``,
    ``EDMClassifier``) or None when the network itself is called as ``net(x, sigma) -> logits``.
    """

    loss: NoisyClassifierLoss
    classifier: Any = None

    def __post_init__(self) -> None:
        _check_template(self.classifier, "classifier")

    @property
    def needs_labels(self) -> bool:
        return True

    def classifier_for(self, net: Callable[..., Array]) -> Any:
        return _with_net(self.classifier, net)

    def __call__(self, net: Callable[..., Array], batch: dict, key: Array) -> tuple[Array, dict]:
        return self.loss(self.classifier_for(net), batch["x"], key, batch["label"]), {}


def drop_context(context: Array, null_context: Array, key: Array, p: Array | float) -> Array:
    """Classifier-free guidance training for sequence conditioning (Ho & Salimans 2022; Stable Diffusion drops
    the caption for the empty prompt's encoding): each row of ``context`` (B, L, D) becomes ``null_context``
    (L, D) with probability ``p``."""
    drop = jax.random.bernoulli(key, jnp.asarray(p, jnp.float32), (context.shape[0],))
    null = jnp.broadcast_to(jnp.asarray(null_context, context.dtype), context.shape)
    return jnp.where(drop[:, None, None], null, context)


@pytree_dataclass
class TextDiffusionObjective:
    """A denoising loss conditioned on text states, as Stable Diffusion trains its U-Net (Rombach et al. 2022,
    eq. 3): ``loss(denoiser, batch["x"], key, cond=batch["context"])`` with ``x`` the scaled latents and
    ``context`` (B, L, D) the frozen text encoder's hidden states of the captions.

    ``denoiser`` is an adapter with ``net=None`` whose network reads ``net(x, t, context)`` (a
    ``UNet2DConditionModel``'s ``(sample, timesteps, encoder_hidden_states)``), e.g.
    ``DiscreteVPDenoiser(None, alphas_cumprod)`` with ``losses.ddpm_loss(alphas_cumprod)`` (Ho et al. 2020 eq. 14).
    ``context_dropout`` (a traced leaf) replaces a caption's states by ``null_context`` (L, D), the empty
    prompt's states, with that probability (classifier-free guidance training; SD used 0.1).
    """

    loss: DenoisingLoss
    denoiser: Any
    null_context: Array
    context_dropout: float = 0.1

    needs_labels = False
    batch_keys = ("x", "context")

    def __post_init__(self) -> None:
        _check_template(self.denoiser, "denoiser")
        p = self.context_dropout
        if isinstance(p, (int, float)) and not 0 <= p < 1:
            raise ValueError(f"context_dropout must be a probability in [0, 1), got {p}")
        shape = getattr(self.null_context, "shape", None)
        if shape is not None and len(shape) != 2:
            raise ValueError(f"null_context must be the empty prompt's states (L, D), got shape {tuple(shape)}; "
                             "drop the batch axis")

    def denoiser_for(self, net: Callable[..., Array]) -> Any:
        """The sampler's denoiser: the template adapter around ``net``."""
        return _with_net(self.denoiser, net)

    def __call__(self, net: Callable[..., Array], batch: dict, key: Array) -> tuple[Array, dict]:
        context = batch["context"]
        if context.ndim != 3 or context.shape[1:] != self.null_context.shape:
            raise ValueError(f"batch['context'] must be (B, {', '.join(map(str, self.null_context.shape))}) text "
                             f"states like null_context, got {tuple(context.shape)}")
        k_loss, k_drop = jax.random.split(key)
        context = drop_context(context, self.null_context, k_drop, self.context_dropout)
        return self.loss(self.denoiser_for(net), batch["x"], k_loss, context), {}
