"""Tiny random DeepFloyd IF folders written by diffusers (save_pretrained, safetensors), and diffusers' noise replaced
by jaxdiff's documented noise streams (see :mod:`jaxdiff.pipelines.deepfloyd_if`).

Two U-Net families: ``"if"`` the components of diffusers' fast tests (tests/pipelines/deepfloyd_if/__init__.py:
ResnetDownsampleBlock2D / SimpleCrossAttn blocks, ``addition_embed_type="text"``, ``encoder_hid_dim``, stage II's
``class_embed_type="timestep"``), and ``"sd"`` plain cross-attention blocks (what the digits cascade stores).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

TEXT_DIM = 32
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02,
                 thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0, prediction_type="epsilon",
                 variance_type="learned_range")
NOISING = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02)


def t5_encoder(seed: int = 0):
    """A tiny random transformers T5EncoderModel (d_model 32, as the fast tests' tiny-random-t5)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=99, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, dropout_rate=0.0)
    return transformers.T5EncoderModel(cfg).eval()


WORDS = ("a", "b", "c", "d", "e", "red", "blue", "two", "seven", "digit")  # whole words: no BPE merges needed


def clip_encoder(seed: int = 0):
    """A tiny random transformers CLIPTextModel over :func:`clip_tokenizer`'s vocabulary (77 positions, as IF pads)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=len(WORDS) + 2, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0,
        eos_token_id=1, pad_token_id=1)).eval()


def clip_tokenizer():
    """transformers' CLIPTokenizer over :data:`WORDS` (BOS 0, EOS and padding 1), written to a temporary folder."""
    import tempfile

    from transformers import CLIPTokenizer

    folder = Path(tempfile.mkdtemp())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w + "</w>": i + 2 for i, w in enumerate(WORDS)}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def unet(family: str, *, super_resolution: bool, size: int, blocks=(32, 64), seed: int = 0, out_mult: int = 2):
    """The stage I (3 -> 6 channels) or stage II (6 -> 6, level as class_labels) U-Net of a family."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    io = dict(in_channels=6 if super_resolution else 3, out_channels=3 * out_mult, sample_size=size)
    if family == "if":
        extra = dict(class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
                     time_embedding_dim=32) if super_resolution else {}
        net = diffusers.UNet2DConditionModel(
            layers_per_block=[1, 2] if super_resolution else 1, block_out_channels=list(blocks),
            down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], cross_attention_dim=TEXT_DIM,
            encoder_hid_dim=TEXT_DIM, attention_head_dim=8, addition_embed_type="text",
            addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
            act_fn="gelu", **extra, **io)
        from diffusers.models.attention_processor import AttnAddedKVProcessor

        net.set_attn_processor(AttnAddedKVProcessor())
    elif family == "sd":
        extra = dict(class_embed_type="timestep") if super_resolution else {}
        n = len(blocks)  # one block: cross-attention only; more: plain last block
        down = ("CrossAttnDownBlock2D",) * max(n - 1, 1) + ("DownBlock2D",) * (n > 1)
        up = ("UpBlock2D",) * (n > 1) + ("CrossAttnUpBlock2D",) * max(n - 1, 1)
        net = diffusers.UNet2DConditionModel(
            block_out_channels=list(blocks), layers_per_block=1, norm_num_groups=8, cross_attention_dim=TEXT_DIM,
            attention_head_dim=4, down_block_types=down, up_block_types=up, **extra, **io)
    else:
        raise ValueError(family)
    return net.eval()


def pipelines(family: str = "if", *, text: str = "t5", variance: str = "learned_range", thresholding: bool = True,
              sizes=(16, 32), blocks=(32, 64), seed: int = 0, out_mult: int = 2):
    """(IFPipeline, IFSuperResolutionPipeline) with random weights; the text encoder is shared. ``variance``: one
    ``variance_type`` for both stages' schedulers, or a pair."""
    import diffusers

    encoder = t5_encoder(seed) if text == "t5" else clip_encoder(seed)
    tok = None if text == "t5" else clip_tokenizer()
    variances = (variance, variance) if isinstance(variance, str) else tuple(variance)
    sched = [{**SCHEDULER, "variance_type": v, "thresholding": thresholding} for v in variances]
    p1 = diffusers.IFPipeline(tokenizer=tok, text_encoder=encoder,
                              unet=unet(family, super_resolution=False, size=sizes[0], blocks=blocks, seed=seed,
                                        out_mult=out_mult),
                              scheduler=diffusers.DDPMScheduler(**sched[0]), safety_checker=None,
                              feature_extractor=None, watermarker=None, requires_safety_checker=False)
    p2 = diffusers.IFSuperResolutionPipeline(
        tokenizer=tok, text_encoder=encoder,
        unet=unet(family, super_resolution=True, size=sizes[1], blocks=blocks, seed=seed + 1, out_mult=out_mult),
        scheduler=diffusers.DDPMScheduler(**sched[1]), image_noising_scheduler=diffusers.DDPMScheduler(**NOISING),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    for p in (p1, p2):
        p.set_progress_bar_config(disable=True)
    return p1, p2


def save_cascade(p1, p2, root: Path) -> Path:
    """``root/stage_1`` and ``root/stage_2`` (safetensors)."""
    p1.save_pretrained(str(root / "stage_1"), safe_serialization=True)
    p2.save_pretrained(str(root / "stage_2"), safe_serialization=True)
    return root


# ---- jaxdiff's noise streams, handed to diffusers --------------------------------------------------------

def stage_noise(seed: int, stage: int, shape_nhwc: tuple, steps: int, augment: bool) -> list[np.ndarray]:
    """The draws diffusers makes for one stage, in its order, NCHW: start noise, (stage II) augmentation noise,
    then one per step with t > 0 (steps - 1 of them): jaxdiff's streams for stage ``stage`` of ``key(seed)``."""
    import jax

    k = jax.random.fold_in(jax.random.key(seed), stage)

    def draw(key):
        return np.asarray(jax.random.normal(key, shape_nhwc, np.float32)).transpose(0, 3, 1, 2).copy()

    out = [draw(jax.random.fold_in(k, 0))]
    if augment:
        out.append(draw(jax.random.fold_in(k, 1)))
    ks = jax.random.fold_in(k, 2)
    out += [draw(jax.random.fold_in(ks, j)) for j in range(steps - 1)]
    return out


@contextlib.contextmanager
def injected_noise(draws: list[np.ndarray]):
    """diffusers' ``randn_tensor`` (IF pipelines and DDPMScheduler) returns ``draws`` in order (shapes checked)."""
    import torch
    from diffusers.pipelines.deepfloyd_if import pipeline_if, pipeline_if_superresolution
    from diffusers.schedulers import scheduling_ddpm

    queue = list(draws)
    modules = (pipeline_if, pipeline_if_superresolution, scheduling_ddpm)
    originals = [m.randn_tensor for m in modules]

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        arr = queue.pop(0)
        assert tuple(arr.shape) == tuple(shape), (arr.shape, shape)
        return torch.from_numpy(arr).to(dtype or torch.float32)

    for m in modules:
        m.randn_tensor = fake
    try:
        yield queue
    finally:
        for m, o in zip(modules, originals):
            m.randn_tensor = o
    assert not queue, f"{len(queue)} noise draws unused"


def config(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())
