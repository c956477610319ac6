"""Contrastive image-text training of CLIP (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", Fig. 3): the symmetric InfoNCE loss over a batch of matching pairs, and a
:class:`ContrastiveTrainer` that reuses the diffusion trainer's state, optimiser, EMA and ``fit`` loop.

Batches are ``{"x": images (B, H, W, C) float, "input_ids": tokens (B, T) int}``, row ``i`` of each being a
pair; optionally ``"attention_mask"`` (B, T), and ``"text_attributes"`` with ``"image_attributes"`` (B, K) ints
(-1: the text does not name that attribute), which turn every text-image pair the text describes into a
positive (:func:`described_positives`, :func:`multi_positive_loss`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff.models.clip import l2_normalize
from jaxdiff.train.step import Trainer, TrainState

Array = jax.Array

MAX_LOGIT_SCALE = 100.0  # Radford et al. 2021, section 2.5: the temperature is clipped so logits scale <= 100
BATCH_KEYS = ("x", "input_ids", "attention_mask", "text_attributes", "image_attributes")


def clip_logits(text_features: Array, image_features: Array, logit_scale: Array,
                max_scale: float | None = MAX_LOGIT_SCALE) -> Array:
    """``logits_per_text`` (texts x images): cosine similarities times ``min(exp(logit_scale), max_scale)``.

    The features need not be normalised. Clipping the scale (instead of the parameter after each step, as
    OpenAI's code does) leaves the loss unchanged below the bound and stops its gradient above it.
    """
    return clipped_scale(logit_scale, max_scale) * (l2_normalize(text_features) @ l2_normalize(image_features).T)


def clipped_scale(logit_scale: Array, max_scale: float | None = MAX_LOGIT_SCALE) -> Array:
    """The temperature the logits are multiplied by: ``min(exp(logit_scale), max_scale)``."""
    scale = jnp.exp(logit_scale)
    return scale if max_scale is None else jnp.minimum(scale, max_scale)


def contrastive_loss(logits_per_text: Array) -> Array:
    """Symmetric cross-entropy of a square similarity matrix whose diagonal holds the pairs:
    ``(CE(texts -> images) + CE(images -> texts)) / 2`` (transformers' ``image_text_contrastive_loss``)."""
    n = logits_per_text.shape[0]
    if logits_per_text.ndim != 2 or logits_per_text.shape[1] != n:
        raise ValueError("the contrastive loss needs as many texts as images (a square matrix), "
                         f"got {logits_per_text.shape}")
    diag = jnp.diagonal(logits_per_text)
    per_text = jax.nn.logsumexp(logits_per_text, axis=1) - diag
    per_image = jax.nn.logsumexp(logits_per_text, axis=0) - diag
    return (jnp.mean(per_text) + jnp.mean(per_image)) / 2


def clip_loss(text_features: Array, image_features: Array, logit_scale: Array,
              max_scale: float | None = MAX_LOGIT_SCALE) -> Array:
    """CLIP's training loss (Fig. 3): normalise, scale by the clipped temperature, cross-entropy both ways."""
    return contrastive_loss(clip_logits(text_features, image_features, logit_scale, max_scale))


def described_positives(text_attributes: Array, image_attributes: Array) -> Array:
    """(B, B) bool: ``True`` where text ``i`` describes image ``j``: every attribute the text names (entries
    >= 0 of ``text_attributes[i]``, -1 meaning "not named") equals the image's (``image_attributes[j]``).

    A caption that names only the digit ("the digit seven") describes every seven in the batch: the plain
    loss would count those images as negatives of it. (Identical captions alone need no such care: their
    rows of logits are identical, and the plain and multi-positive losses are then the same function.)"""
    t, v = text_attributes[:, None, :], image_attributes[None, :, :]
    return jnp.all((t < 0) | (t == v), axis=-1)


def multi_positive_loss(logits_per_text: Array, positives: Array) -> Array:
    """Symmetric cross-entropy against multi-positive targets (UniCL, Yang et al. 2022, eq. 3-4): each text's
    target is uniform over its positive images and each image's over its positive texts,
    ``-sum_j q_ij log softmax(logits)_ij`` with ``q = positives / positives.sum(row)``. With only the diagonal
    positive it is :func:`contrastive_loss`."""
    n = logits_per_text.shape[0]
    if logits_per_text.shape != (n, n) or positives.shape != (n, n):
        raise ValueError(f"logits and positives must be the same square matrix shape, got "
                         f"{logits_per_text.shape} and {positives.shape}")
    pos = positives.astype(logits_per_text.dtype)
    q_text = pos / jnp.sum(pos, axis=1, keepdims=True)
    q_image = pos / jnp.sum(pos, axis=0, keepdims=True)
    per_text = jax.nn.logsumexp(logits_per_text, axis=1) - jnp.sum(q_text * logits_per_text, axis=1)
    per_image = jax.nn.logsumexp(logits_per_text, axis=0) - jnp.sum(q_image * logits_per_text, axis=0)
    return (jnp.mean(per_text) + jnp.mean(per_image)) / 2


def matching_accuracy(logits_per_text: Array) -> tuple[Array, Array]:
    """Fractions of texts whose best image is their pair, and of images whose best text is their pair."""
    target = jnp.arange(logits_per_text.shape[0])
    text_to_image = jnp.mean(jnp.argmax(logits_per_text, axis=1) == target)
    image_to_text = jnp.mean(jnp.argmax(logits_per_text, axis=0) == target)
    return text_to_image, image_to_text


@pytree_dataclass
class ContrastiveObjective:
    """The objective for :class:`ContrastiveTrainer`: ``net(input_ids, x, attention_mask)`` must return an output
    with ``text_embeds``, ``image_embeds`` and ``logit_scale`` (:class:`jaxdiff.models.clip.CLIPModel` does)."""

    max_logit_scale: float | None = static_field(default=MAX_LOGIT_SCALE)

    needs_labels = False

    def __call__(self, net: Callable[..., Any], batch: dict, key: Array) -> tuple[Array, dict]:
        del key  # deterministic
        out = net(batch["input_ids"], batch["x"], batch.get("attention_mask"))
        logits = clip_logits(out.text_embeds, out.image_embeds, out.logit_scale, self.max_logit_scale)
        t2i, i2t = matching_accuracy(logits)
        if "text_attributes" in batch:  # multi-positive: a text matches every image it describes
            positives = described_positives(batch["text_attributes"], batch["image_attributes"])
            loss = multi_positive_loss(logits, positives | jnp.eye(len(logits), dtype=bool))
        else:
            loss = contrastive_loss(logits)
        return loss, {"text_to_image_accuracy": t2i, "image_to_text_accuracy": i2t,
                      "logit_scale": clipped_scale(out.logit_scale, self.max_logit_scale)}


class ContrastiveTrainer(Trainer):
    """:class:`jaxdiff.train.Trainer` for image-text pairs: same state, optimiser, EMA, data parallelism and
    :func:`jaxdiff.train.fit` loop; batches carry ``input_ids`` beside ``x``. Build with
    ``ContrastiveTrainer.create(clip_model, ContrastiveObjective(), OptimizerConfig(...), sample_shape=(H, W, C))``.
    The loss is computed in float32 (``compute_dtype`` is refused)."""

    def __post_init__(self) -> None:
        if self.compute_dtype is not None:
            raise ValueError("ContrastiveTrainer computes in float32; drop compute_dtype=")
        super().__post_init__()

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Raise a clear ValueError if a batch is not ``{"x": (B, H, W, C) float, "input_ids": (B, T) int}``."""
        if not isinstance(batch, Mapping) or "x" not in batch or "input_ids" not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"a contrastive batch needs keys 'x' (images) and 'input_ids' (tokens), got {keys}")
        super().check_batch(batch)  # the images and the mesh
        x, ids = batch["x"], batch["input_ids"]
        if ids.ndim != 2 or ids.shape[0] != x.shape[0] or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"batch['input_ids'] must be integers of shape ({x.shape[0]}, length), "
                             f"got {ids.dtype} {tuple(ids.shape)}")
        if "attention_mask" in batch and tuple(batch["attention_mask"].shape) != tuple(ids.shape):
            raise ValueError(f"batch['attention_mask'] must have the shape of input_ids {tuple(ids.shape)}")
        if ("text_attributes" in batch) != ("image_attributes" in batch):
            raise ValueError("batch needs both 'text_attributes' and 'image_attributes' (or neither)")
        if "text_attributes" in batch:
            t, v = batch["text_attributes"], batch["image_attributes"]
            if t.ndim != 2 or t.shape != v.shape or t.shape[0] != x.shape[0]:
                raise ValueError(f"batch['text_attributes'] and ['image_attributes'] must both be ({x.shape[0]}, K), "
                                 f"got {tuple(t.shape)} and {tuple(v.shape)}")

    def batch_keys(self, batch: Mapping[str, Any]) -> tuple[str, ...]:
        """Images, tokens and the attention mask when the batch has one."""
        return tuple(k for k in BATCH_KEYS if k in batch)

    def denoiser(self, state: TrainState, ema: bool = True) -> Any:
        raise TypeError("a contrastive run trains an encoder, not a denoiser: use trainer.model(state)")

