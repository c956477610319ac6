"""A tiny Stable Diffusion built directly in JAX (random weights, no torch) with a tiny CLIP vocabulary."""
from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

WORDS = ("a", "b", "c", "d", "e")  # single letters: no BPE merges needed


def tokenizer(folder: Path, max_length: int = 8):
    """transformers' CLIPTokenizer over a few whole words (BOS 0, EOS 1), written to ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w + "</w>": i + 2 for i, w in enumerate(WORDS)}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _random(ctor, seed: int):
    """Build a module abstractly and fill it with host-drawn normal values (no per-initializer compiles)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    state = jax.tree_util.tree_map(lambda x: np.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


def build(folder: Path, *, in_channels: int = 4, seed: int = 0):
    """A StableDiffusion: one-block U-Net (8 channels), two-block VAE (factor 2), one-layer CLIP."""
    from jaxdiff.models.clip import CLIPTextConfig, CLIPTextModel
    from jaxdiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel
    from jaxdiff.models.vae import AutoencoderKL, AutoencoderKLConfig
    from jaxdiff.pipelines import StableDiffusion, training_schedule

    unet = _random(lambda: UNet2DConditionModel(UNet2DConditionConfig(
        sample_size=8, in_channels=in_channels, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=8, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",)), rngs=nnx.Rngs(0)), seed)
    vae = _random(lambda: AutoencoderKL(AutoencoderKLConfig(
        block_out_channels=(8, 8), norm_num_groups=4, sample_size=8, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2),
                                        rngs=nnx.Rngs(0)), seed + 1)
    text = _random(lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=len(WORDS) + 2, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, eos_token_id=1), rngs=nnx.Rngs(0)), seed + 2)
    train = training_schedule({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                               "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "clip_sample": False})
    return StableDiffusion.from_modules(unet, vae, text, tokenizer(folder), train, name="tiny")
