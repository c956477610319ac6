"""GLIDE's base + upsampler chain with real (tiny, random) GLIDE networks, in one compiled program.

Builds a small base ``GlideUNet`` (16 px) and a ``super_res`` upsampler (32 px) with openai's layout, saves them
as openai-named safetensors and loads them back (what a converted ``base.pt`` / ``upsample.pt`` would go
through), encodes a text prompt (lower-cased, GPT-2 byte-pair encoded with the vocabulary jaxdiff ships, padded
with the end token and a mask) and the empty prompt, then samples: base with DDPM and the
network's variance, classifier-free guidance on the mean; upsampler with DDIM ``fast27`` at temperature 0.997.
A second call with another prompt (given as token ids), guidance scale, base step count and temperature reuses
the program and the text encoder's. A third
adds CLIP guidance to the base with a tiny random noise-aware CLIP image tower (GLIDE's ``clip/`` layout; the
exact learned-variance mean shift of eq. 4), after classifier-free guidance and clipping as openai's sampler
applies ``cond_fn`` after ``p_mean_variance``.

    python examples/glide/tiny_cascade.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAXDIFF_CPU_DEVICES", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxdiff.clip_guidance import clip_guidance  # noqa: E402
from jaxdiff.convert.glide import load_glide, save_openai  # noqa: E402
from jaxdiff.models._pure import PureModel  # noqa: E402
from jaxdiff.models.glide import GLIDE_VOCAB, GlideConfig, GlideUNet  # noqa: E402
from jaxdiff.models.glide_clip import GlideCLIPConfig, NoisedCLIPEmbedding, NoisedImageEncoder  # noqa: E402
from jaxdiff.models.gpt2_tokenizer import gpt2_tokenizer  # noqa: E402
from jaxdiff.pipelines.glide import (_encode_jit, base_stage, glide_alphas_cumprod, glide_cascade_jit,  # noqa: E402
                                     respaced_sigmas, text_conditions, upsampler_stage)

SMALL = dict(num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,), num_head_channels=16,
             text_ctx=16, xf_width=32, xf_layers=2, xf_heads=2, n_vocab=GLIDE_VOCAB, norm_num_groups=8)


def main() -> None:
    base_cfg, up_cfg = GlideConfig(image_size=16, **SMALL), GlideConfig(image_size=32, super_res=True, **SMALL)
    with tempfile.TemporaryDirectory() as tmp:
        nets = []
        for i, cfg in enumerate((base_cfg, up_cfg)):
            path = Path(tmp) / f"glide_{i}.safetensors"
            save_openai(GlideUNet(cfg, rngs=nnx.Rngs(i)), path)
            nets.append(PureModel.of(load_glide(path, cfg)))
    corgi = "An oil painting of a corgi"
    print(f"{corgi!r} -> GPT-2 ids {gpt2_tokenizer().glide_encode(corgi)} (lower-cased, as GLIDE encodes)")
    apple = gpt2_tokenizer().encode("a red apple")  # the token-id path
    for run, (prompt, guidance, respacing, temp) in enumerate(((corgi, 3.0, "100", 0.997), (apple, 5.0, "50", 1.0))):
        text, uncond = text_conditions(nets[0], prompt, 2)
        base = base_stage(nets[0], text, uncond, guidance=guidance, respacing=respacing, shape=(16, 16, 3))
        up = upsampler_stage(nets[1], text_conditions(nets[1], prompt, 2)[0], shape=(32, 32, 3))
        started = time.perf_counter()
        low, high = glide_cascade_jit(base, up, jax.random.key(run), 2, temp)
        high.block_until_ready()
        print(f"run {run}: base {respacing} steps, guidance {guidance}, temperature {temp}: {low.shape} -> "
              f"{high.shape} in {time.perf_counter() - started:.1f} s; range [{float(high.min()):.2f}, "
              f"{float(high.max()):.2f}]; programs compiled so far: {glide_cascade_jit._cache_size()}")
    assert glide_cascade_jit._cache_size() == 1 and np.isfinite(np.asarray(high)).all()
    print(f"text encoder programs compiled: {_encode_jit._cache_size()} (one per network, any prompt)")

    clip_cfg = GlideCLIPConfig(image_size=16, patch_size=4, n_embd=16, n_head=2, n_head_state=16, n_xf_blocks=2)
    embed = NoisedCLIPEmbedding(PureModel.of(NoisedImageEncoder(clip_cfg, rngs=nnx.Rngs(7))),
                                jnp.asarray(glide_alphas_cumprod("squaredcos_cap_v2")))
    caption = jax.random.normal(jax.random.key(8), (16,))
    caption = caption / jnp.linalg.norm(caption)
    sigmas = respaced_sigmas(glide_alphas_cumprod("squaredcos_cap_v2"), "100")
    for scale in (100.0 * 3.0, 0.0):  # the notebook's guidance scale 3 times exp(logit_scale)
        guide = clip_guidance(embed, caption, scale, schedule=sigmas, variance="learned_range")
        base = base_stage(nets[0], *text_conditions(nets[0], corgi, 2), guidance=3.0, respacing="100",
                          shape=(16, 16, 3), transform=guide)
        (low,) = glide_cascade_jit(base, None, jax.random.key(0), 2)
        score = float(jnp.mean(embed(low, jnp.full((2,), 1e-3)) @ caption))
        print(f"CLIP-guided base, scale {scale:g}: f(x0) . g = {score:.3f}; programs compiled: "
              f"{glide_cascade_jit._cache_size()}")


if __name__ == "__main__":
    main()
