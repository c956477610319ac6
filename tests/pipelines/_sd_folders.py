"""Tiny random Stable Diffusion folders written by diffusers (save_pretrained, safetensors) for the pipeline tests."""
from __future__ import annotations

from pathlib import Path

TEXT_DIM = 32


def tokenizer():
    """OpenAI CLIP's tokenizer built offline from the BPE file jaxdiff ships (77 tokens)."""
    from jaxdiff.models.tokenizers import clip_tokenizer_from_bpe

    return clip_tokenizer_from_bpe(model_max_length=77)


def build_pipeline(*, prediction: str = "epsilon", in_channels: int = 4, blocks: tuple[int, ...] = (8, 16),
                   layers: int = 1, vae_blocks: tuple[int, ...] = (8, 16), seed: int = 0):
    """A tiny StableDiffusionPipeline (or inpainting pipeline when in_channels == 9) with random weights."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(seed)
    n = len(blocks)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=blocks, layers_per_block=layers, norm_num_groups=4, cross_attention_dim=TEXT_DIM,
        attention_head_dim=4, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1))
    vae = diffusers.AutoencoderKL(
        block_out_channels=vae_blocks, norm_num_groups=4, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
        up_block_types=("UpDecoderBlock2D",) * len(vae_blocks))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=49408,
        max_position_embeddings=77, projection_dim=TEXT_DIM, hidden_act="quick_gelu"))
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False,
                                        prediction_type=prediction)
    cls = diffusers.StableDiffusionInpaintPipeline if in_channels == 9 else diffusers.StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tokenizer(), unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(torch.float32)


def save(pipe, root: Path) -> Path:
    """save_pretrained with safetensors; the scheduler config says clip_sample: false, as SD 1.x/2.x folders do."""
    import json

    pipe.save_pretrained(str(root), safe_serialization=True)
    path = root / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["clip_sample"] = False
    path.write_text(json.dumps(config, indent=2))
    return root
