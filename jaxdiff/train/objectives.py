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
