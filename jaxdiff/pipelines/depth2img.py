"""Depth-to-image (Stable Diffusion 2 depth) as diffusers' ``StableDiffusionDepth2ImgPipeline`` runs it.

The U-Net reads ``latent_channels + 1`` input channels: the noisy latents, then a depth map resized to the latent
size with bicubic interpolation (``align_corners=False``) and normalised per image to [-1, 1] by its minimum and
maximum. The depth map is the user's (``depth_map=``) or is estimated from the init image by the folder's DPT
(:class:`jaxdiff.models.dpt.DPTForDepthEstimation`; its ``feature_extractor`` config drives
:func:`jaxdiff.models.dpt.preprocess`). It enters as a network transform (:func:`jaxdiff.conditioning.concat`,
tiled over the classifier-free-guidance batch) around image-to-image with ``strength``::

    pipe = depth2img.load("stable-diffusion-2-depth")
    images = pipe("a stone house", image=photo, strength=0.8, steps=30, guidance=7.5, seed=0)
    images = pipe("a stone house", image=photo, depth_map=depth, strength=1.0)

The whole generation (the DPT, the depth resize and normalisation, text encoding, the sampling loop, VAE encode
and decode) is one jit-compiled program: new depth maps of the same size, images, prompts, seeds, strengths and
step counts reuse it.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance
from jaxdiff._pytree import pytree_dataclass
from jaxdiff.models.dpt import DPTProcessorConfig, interpolate, preprocess
from jaxdiff.models._pure import PureModel
from jaxdiff.pipelines import stable_diffusion as _sd

Array = jax.Array

__all__ = ["DepthInput", "StableDiffusionDepth", "depth_latents", "depth_map_array", "generate", "generate_jit",
           "is_depth_folder", "load", "load_depth_map"]


@pytree_dataclass
class DepthInput:
    """Where the depth comes from (its structure picks the branch): the DPT's ``pixels`` (B, S, S', 3), or the
    user's ``depth`` maps (B, Hd, Wd)."""

    pixels: Array | None = None
    depth: Array | None = None


def depth_latents(dpt: Any, d: DepthInput, height: int, width: int) -> Array:
    """The U-Net's depth channel (B, height, width, 1): the DPT's or the user's depth, resized bicubically
    (``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``) and mapped per image to
    [-1, 1] by ``2 (d - min) / (max - min) - 1`` (diffusers' ``prepare_depth_map``)."""
    raw = dpt(d.pixels) if d.depth is None else d.depth
    x = interpolate(raw.astype(jnp.float32)[..., None], (height, width), "bicubic", False)
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    return 2.0 * (x - lo) / (hi - lo) - 1.0


def generate(m: _sd.SDModels, dpt: Any, sampler: Any, req: _sd.Request, depth: DepthInput, transform: Any = None,
             network_transform: Any = None, *, height: int, width: int, quantize: bool = False, progress: bool = False,
             latent: bool = False) -> Array:
    """The pure program: images (B, H, W, 3) in [0, 1] (or with ``latent`` the final latents)."""
    f = m.vae_factor
    network_transform, req = _sd.with_per_image(network_transform, req)
    per = _sd.encode(m, req)
    per["depth"] = depth_latents(dpt, depth, height // f, width // f).astype(per["ctx"].dtype)  # the recipe concats it
    static = dict(latent_shape=(height // f, width // f, m.latent_channels))
    lat = jax.vmap(lambda i: _sd._one_image(m, sampler, req, {**i, **static}, transform, network_transform, quantize,
                                            progress))(per)
    return lat if latent else m.decode(lat)


@jax.jit
def _estimate_jit(dpt: Any, pixels: Array) -> Array:
    return dpt(pixels)


generate_jit = jax.jit(generate, static_argnames=("height", "width", "quantize", "progress", "latent"))


# ---- host side ---------------------------------------------------------------------------------------------

def _to_numpy(a: Any) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().float().numpy()
    if hasattr(a, "convert"):  # PIL: a gray depth image (16-bit and float modes keep their precision)
        return np.asarray(a if a.mode in ("I", "I;16", "F") else a.convert("L"), np.float32)
    return np.asarray(a, np.float32)


def depth_map_array(depth_map: Any, batch: int) -> np.ndarray:
    """A user depth map -> (batch, Hd, Wd) float32: a torch tensor or array (B, Hd, Wd) as diffusers takes, one
    (Hd, Wd) map, or a gray PIL image (or a list of them). Fewer maps than images are repeated as diffusers does
    (``repeat(batch // B)``), which needs ``batch % B == 0``. Any scale works (each map is min-max normalised);
    larger values are nearer, as the DPT's relative inverse depth."""
    if isinstance(depth_map, (list, tuple)):
        arr = np.stack([_to_numpy(d) for d in depth_map])
    else:
        arr = _to_numpy(depth_map)
        arr = arr[None] if arr.ndim == 2 else arr
    if arr.ndim != 3:
        raise ValueError(f"depth_map must be (batch, height, width) (one channel) or one (height, width) map, got "
                         f"shape {arr.shape}; convert an RGB depth image to gray (PIL .convert('L')) or take one "
                         "channel")
    b = arr.shape[0]
    if b > batch or batch % b:
        raise ValueError(f"got {b} depth maps for {batch} images; give one, or one per image (or a divisor of "
                         f"{batch}, repeated as diffusers does)")
    if not np.all(np.isfinite(arr)):
        raise ValueError("depth_map contains NaN or Inf")
    flat = arr.reshape(b, -1)
    if np.any(flat.max(axis=1) <= flat.min(axis=1)):
        raise ValueError("a depth map is constant, so it cannot be normalised to [-1, 1] (diffusers would produce "
                         "NaN); give a map with depth variation, or leave depth_map=None to estimate it")
    return np.tile(arr, (batch // b, 1, 1)).astype(np.float32)


def load_depth_map(path: str | os.PathLike) -> np.ndarray:
    """A depth image file (8- or 16-bit gray PNG, or RGB, converted to gray) -> (1, H, W) float32 for ``depth_map=``."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return depth_map_array(im, 1)


@dataclasses.dataclass
class StableDiffusionDepth:
    """A loaded SD 2 depth folder: the SD recipe (:class:`~jaxdiff.pipelines.stable_diffusion.StableDiffusion`),
    the DPT depth estimator (``None`` when the folder has none: then pass ``depth_map=``) and its preprocessing."""

    sd: _sd.StableDiffusion
    depth_estimator: PureModel | None = None
    processor: DPTProcessorConfig | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: Any = jnp.float32,
                        variant: str | None = None) -> "StableDiffusionDepth":
        """A diffusers ``StableDiffusionDepth2ImgPipeline`` folder (``unet``, ``vae``, ``text_encoder``,
        ``tokenizer``, ``scheduler``, ``depth_estimator``, ``feature_extractor``; safetensors only)."""
        from jaxdiff.convert import load_component, read_component_config
        from jaxdiff.convert.folders import read_model_index

        path = Path(path)
        sd = _sd.StableDiffusion.from_pretrained(path, dtype=dtype, variant=variant)
        pf = read_model_index(path)
        dpt = proc = None
        if pf.components.get("depth_estimator", (None, None))[1] is not None:
            dpt = PureModel.of(load_component(path, "depth_estimator", dtype=dtype, variant=variant))
            if pf.components.get("feature_extractor", (None, None))[1] is None:
                raise ValueError(f"{path} has a depth_estimator but no feature_extractor (its preprocessing config); "
                                 "copy feature_extractor/preprocessor_config.json from the original model")
            proc = DPTProcessorConfig.from_dict(read_component_config(path, "feature_extractor"))
        return cls.from_parts(sd, dpt, proc)

    @classmethod
    def from_parts(cls, sd: _sd.StableDiffusion, depth_estimator: Any = None,
                   processor: Mapping[str, Any] | DPTProcessorConfig | None = None) -> "StableDiffusionDepth":
        """Assemble from a loaded SD (its U-Net reading ``latent_channels + 1`` channels), a DPT (module or
        ``PureModel``) and its preprocessor config."""
        m = sd.models
        if m.unet_in_channels != m.latent_channels + 1:
            raise ValueError(f"depth-to-image needs a U-Net reading {m.latent_channels + 1} channels (latents + "
                             f"depth), this one reads {m.unet_in_channels}; load a depth model "
                             "(stabilityai/stable-diffusion-2-depth)")
        if depth_estimator is not None and not isinstance(depth_estimator, PureModel):
            depth_estimator = PureModel.of(depth_estimator)
        if processor is not None and not isinstance(processor, DPTProcessorConfig):
            processor = DPTProcessorConfig.from_dict(processor)
        return cls(sd, depth_estimator, processor or (DPTProcessorConfig() if depth_estimator is not None else None))

    def depth_input(self, image: Any, depth_map: Any, batch: int) -> DepthInput:
        """The checked depth source for ``batch`` images: the user's maps, or the DPT's pixel values of ``image``."""
        if depth_map is not None:
            return DepthInput(depth=jnp.asarray(depth_map_array(depth_map, batch)))
        if self.depth_estimator is None:
            raise ValueError("this pipeline has no depth estimator: pass depth_map= (or load a folder with "
                             "depth_estimator/ and feature_extractor/)")
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(items) == 1 and not hasattr(items[0], "convert") and np.ndim(items[0]) == 4:
            items = list(np.asarray(items[0]))
        pixels = preprocess(items, self.processor)
        if pixels.shape[0] == 1 and batch > 1:
            pixels = np.repeat(pixels, batch, axis=0)
        return DepthInput(pixels=jnp.asarray(pixels))

    def estimate_depth(self, image: Any) -> np.ndarray:
        """The DPT's raw predicted depth (B, H', W') of ``image`` (PIL image(s) or arrays in [0, 1])."""
        d = self.depth_input(image, None, 1)
        return np.asarray(_estimate_jit(self.depth_estimator, d.pixels))

    def __call__(self, prompt: str | Sequence[str], *, image: Any = None, depth_map: Any = None,
                 strength: float = 0.8, steps: int = 50, guidance: Any = 7.5, seed: int | Sequence[int] | None = 0,
                 negative: str | Sequence[str] | None = None, sampler: str | None = None, schedule: str | None = None,
                 rescale: float = 0.0, sampler_options: Mapping[str, Any] | None = None, transform: Any = None,
                 network_transform: Any = None, output: str = "np", progress: bool = False) -> Any:
        """Generate: ``output="np"`` (B, H, W, 3) in [0, 1], ``"pil"`` PIL images or ``"latent"``.

        ``image`` (required, as in diffusers): PIL image(s) or arrays (H, W, 3) / (B, H, W, 3) in [0, 1], the start
        of image-to-image at ``strength`` and, without ``depth_map``, what the DPT reads. ``depth_map``: see
        :func:`depth_map_array`. ``transform`` / ``network_transform`` as :meth:`StableDiffusion.__call__`.
        """
        if output not in ("np", "pil", "latent"):
            raise ValueError(f"output must be 'np', 'pil' or 'latent', got {output!r}")
        if image is None:
            raise ValueError("depth-to-image needs an init image (image=...): it is the start point of the sampling "
                             "and, without depth_map=, the picture whose depth is estimated")
        req, plan, static = self.sd.request(prompt, negative=negative, steps=steps, sampler=sampler, schedule=schedule,
                                            guidance=guidance, rescale=rescale, seed=seed, image=_stack_images(image),
                                            strength=strength, sampler_options=sampler_options)
        depth = self.depth_input(image, depth_map, int(req.seeds.shape[0]))
        out = np.asarray(generate_jit(self.sd.models, self.depth_estimator, plan.sampler, req, depth,
                                      guidance_chain(plan, transform), network_transform, progress=progress,
                                      latent=output == "latent", **static))
        if not np.all(np.isfinite(out)):
            raise FloatingPointError("generation produced NaN/Inf; try float32 or a lower guidance scale")
        if output == "pil":
            from jaxdiff.images import to_pil

            return [to_pil(im) for im in out]
        return out


def _stack_images(image: Any) -> Any:
    """A list of images -> one (B, H, W, 3) array in [0, 1] (PIL images divided by 255)."""
    if not isinstance(image, (list, tuple)):
        return image
    arrs = [np.asarray(im.convert("RGB"), np.float32) / 255.0 if hasattr(im, "convert") else np.asarray(im, np.float32)
            for im in image]
    if len({a.shape for a in arrs}) != 1:
        raise ValueError(f"the init images have different sizes {sorted({a.shape for a in arrs})}; give one size")
    return np.stack(arrs)


def guidance_chain(plan: Any, transform: Any) -> Any:
    """The plan's threshold, then the user's denoiser transforms (as :meth:`StableDiffusion.run`)."""
    return guidance.chain(plan.threshold, transform)


def is_depth_folder(path: str | Path) -> bool:
    """Whether a diffusers folder is a depth-to-image model: its U-Net reads the VAE's latent channels + 1 (SD 2
    depth; ``model_index.json`` then usually names ``StableDiffusionDepth2ImgPipeline``)."""
    from jaxdiff.convert import read_component_config

    path = Path(path)
    if not (path / "model_index.json").is_file():
        return False
    unet, vae = read_component_config(path, "unet"), read_component_config(path, "vae")
    return int(unet.get("in_channels", 4)) == int(vae.get("latent_channels", 4)) + 1


def load(path: str | Path, **kwargs: Any) -> StableDiffusionDepth:
    """``StableDiffusionDepth.from_pretrained(path, **kwargs)``: a diffusers SD 2 depth folder."""
    return StableDiffusionDepth.from_pretrained(path, **kwargs)
