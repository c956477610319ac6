"""Throughput of Stable Diffusion sampling: images/s, first-call (compile) time and peak memory.

Used by ``sampler_throughput.py``, ``thread_scaling.py`` and ``jaxdiff bench`` (which loads this file from
the source checkout). ``SIZES`` are SD-architecture configurations (random weights give the true cost):
``tiny`` and ``mid`` (U-Net block channels 64/128/256, 2 layers a block, 32x32 latents).
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(unet=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                           attention_head_dim=4, sample_size=16,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                 vae=dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)),
    "mid": dict(unet=dict(block_out_channels=(64, 128, 256), layers_per_block=2, norm_num_groups=32,
                          cross_attention_dim=64, attention_head_dim=8, sample_size=32,
                          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
                vae=dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=16, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
                text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)),
}
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True,
             "timestep_spacing": "leading", "clip_sample": False, "prediction_type": "epsilon"}
PROMPT = "a photograph of an astronaut riding a horse"


def _size(name: str) -> dict:
    if name not in SIZES:
        raise ValueError(f"unknown benchmark size {name!r}; valid: {', '.join(SIZES)}")
    return SIZES[name]


def tokenizer(max_length: int = 77) -> Any:
    """OpenAI CLIP's tokenizer, from the BPE merges file jaxdiff ships."""
    from jaxdiff.models.tokenizers import clip_tokenizer_from_bpe

    return clip_tokenizer_from_bpe(model_max_length=max_length)


def random_pipeline(size: str = "tiny", seed: int = 0, dtype: Any = None) -> Any:
    """A :class:`StableDiffusion` of the given size with random weights (drawn on the host, std 0.02)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiff.models.clip import CLIPTextConfig, CLIPTextModel
    from jaxdiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel
    from jaxdiff.models.vae import AutoencoderKL, AutoencoderKLConfig
    from jaxdiff.pipelines import StableDiffusion, training_schedule

    cfg, dtype = _size(size), dtype or jnp.float32
    rng = np.random.default_rng(seed)

    def fill(ctor: Any) -> Any:
        graphdef, state = nnx.split(nnx.eval_shape(ctor))
        state = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(0.0, 0.02, x.shape), x.dtype), state)
        return nnx.merge(graphdef, state)

    tok = tokenizer()
    unet = fill(lambda: UNet2DConditionModel(UNet2DConditionConfig.from_dict(cfg["unet"]), rngs=nnx.Rngs(0),
                                             dtype=dtype, param_dtype=dtype))
    vae = fill(lambda: AutoencoderKL(AutoencoderKLConfig.from_dict(cfg["vae"]), rngs=nnx.Rngs(0), dtype=dtype,
                                     param_dtype=dtype))
    text = fill(lambda: CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77, **cfg["text"]),
                                      rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    return StableDiffusion.from_modules(unet, vae, text, tok, training_schedule(SCHEDULER), name=f"random-{size}")


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def measure(sd: Any, *, batch: int = 1, steps: int = 20, guidance: float = 7.5, sampler: str = "dpmpp_2m",
            repeats: int = 3) -> dict:
    """Time the compiled program: first call (compile + one run), then ``repeats`` runs with new seeds.
    On CPU the batch is split over the CPU devices as ``sd(...)`` does (:meth:`StableDiffusion.run`)."""
    from jaxdiff import parallel

    def call(seed0: int) -> float:
        req, plan, static = sd.request([PROMPT] * batch, negative="", steps=steps, sampler=sampler,
                                       guidance=guidance, seed=seed0)
        t0 = time.perf_counter()
        sd.run(req, plan, static)  # returns host arrays: finished
        return time.perf_counter() - t0

    first = call(0)
    runs = [call(1000 * (i + 1)) for i in range(repeats)]
    run = statistics.median(runs)
    mesh = parallel.sampling_mesh(batch)
    return {"batch": batch, "steps": steps, "sampler": sampler, "guidance": guidance,
            "devices": 1 if mesh is None else int(mesh.size), "mesh": None if mesh is None else dict(mesh.shape),
            "images_per_s": batch / run, "seconds_per_batch": run, "runs_s": runs,
            "first_call_s": first, "compile_s": max(first - run, 0.0), "peak_rss_mb": peak_rss_mb()}


def run(size: str = "tiny", model: str | None = None, **kwargs: Any) -> dict:
    """Load ``model`` (a diffusers folder) or build a random ``size`` model, then :func:`measure`."""
    import jax

    from jaxdiff.pipelines import StableDiffusion

    t0 = time.perf_counter()
    sd = StableDiffusion.from_pretrained(model) if model else random_pipeline(size)
    load = time.perf_counter() - t0
    result = measure(sd, **kwargs)
    dtype = jax.tree_util.tree_leaves(sd.models.unet)[0].dtype
    return {"framework": "jaxdiff", "model": model or f"random-{size}", "load_s": load,
            "resolution": f"{sd.default_size}x{sd.default_size}", "dtype": str(dtype),
            "device": str(jax.devices()[0]), "jax": jax.__version__, **result}
