"""Video diffusion training with joint image-video batches (Ho et al. 2022, "Video Diffusion Models", Sec. 3).

The paper concatenates independent image frames to each video and masks the temporal attention so that
those frames neither see nor are seen by any other frame; every other layer is per-frame already. Here the
image frames go through the same network with its temporal layers off (``net(x, t, cond, temporal=False)``,
:class:`Framewise`), which is that masking exactly: each image frame's output depends on that frame only (the
video frames' outputs are untouched by the images, and vice versa), and one set of weights takes both losses.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff._pytree import pytree_dataclass, static_field
from jaxdiff.losses import DenoisingLoss
from jaxdiff.train.objectives import _check_template, _with_net, drop_labels

Array = jax.Array


@pytree_dataclass
class Framewise:
    """``net(x, t, cond, temporal=False)``: a video network with its temporal layers masked (frames independent)."""

    net: Callable[..., Array]

    def __call__(self, x: Array, t: Array, cond: Any = None) -> Array:
        return self.net(x, t, cond, temporal=False)


@pytree_dataclass
class JointVideoObjective:
    """Class-conditional video denoising loss plus, optionally, the loss of extra independent image frames.

    ``batch["x"]`` (B, F, H, W, C) videos with ``batch["label"]`` (B,); ``images_per_video = K > 0`` also reads
    ``batch["images"]`` (B, K, H, W, C) and ``batch["image_label"]`` (B, K): each image is a 1-frame sample with
    its own noise level, through :class:`Framewise`. The per-video loss is
    ``loss_video + image_weight * mean_k loss_image_k`` (both losses are per-element means). ``label_dropout``
    replaces labels (videos' and images' independently) by ``null_label`` (classifier-free guidance training).
    ``images_per_video = 0`` is video-only training.
    """

    loss: DenoisingLoss
    denoiser: Any
    label_dropout: float = 0.1
    image_weight: float = 1.0
    images_per_video: int = static_field(default=0)
    null_label: int = static_field(default=10)

    needs_labels = True

    def __post_init__(self) -> None:
        _check_template(self.denoiser, "denoiser")
        p = self.label_dropout
        if isinstance(p, (int, float)) and not 0 <= p < 1:
            raise ValueError(f"label_dropout must be a probability in [0, 1), got {p}")
        if self.images_per_video < 0:
            raise ValueError(f"images_per_video must be >= 0 (0: video-only training), got {self.images_per_video}")

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("x", "label", "images", "image_label") if self.images_per_video else ("x", "label")

    def denoiser_for(self, net: Callable[..., Array]) -> Any:
        """The sampler's (video) denoiser: the template adapter around ``net``."""
        return _with_net(self.denoiser, net)

    def __call__(self, net: Callable[..., Array], batch: dict, key: Array) -> tuple[Array, dict]:
        k_video, k_drop, k_image, k_drop_image = jax.random.split(key, 4)
        labels = drop_labels(batch["label"], k_drop, self.label_dropout, self.null_label)
        video = self.loss(self.denoiser_for(net), batch["x"], k_video, labels)
        aux = {"video_loss": jnp.mean(video)}
        if not self.images_per_video:
            return video, aux
        images = batch["images"]
        b, k = images.shape[:2]
        if k != self.images_per_video or batch["image_label"].shape != (b, k):
            raise ValueError(f"batch['images'] must be (B, {self.images_per_video}, H, W, C) with image_label "
                             f"(B, {self.images_per_video}); got {images.shape} and {batch['image_label'].shape}")
        image_labels = drop_labels(batch["image_label"].reshape(-1), k_drop_image, self.label_dropout, self.null_label)
        frames = images.reshape(b * k, 1, *images.shape[2:])
        per_image = self.loss(self.denoiser_for(Framewise(net)), frames, k_image, image_labels).reshape(b, k)
        image = per_image.mean(axis=1)
        aux["image_loss"] = jnp.mean(image)
        return video + jnp.asarray(self.image_weight, video.dtype) * image, aux
