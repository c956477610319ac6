"""Tiny reference (PyTorch) models and pipelines saved the way users' checkpoints are saved.

Each builder returns a torch module with random weights (fixed seed); ``save_pretrained`` writes
config.json + safetensors exactly as diffusers / transformers do for the public checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path

TINY_UNET = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
                 attention_head_dim=2, sample_size=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, layers_per_block=1, sample_size=16,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
TINY_CLIP_TEXT = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      vocab_size=100, max_position_embeddings=16, projection_dim=8)


def build(class_name: str):
    """A tiny torch instance of a reference class from jaxdiff's registry."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    if class_name == "UNet2DConditionModel":
        return diffusers.UNet2DConditionModel(**TINY_UNET)
    if class_name == "AutoencoderKL":
        return diffusers.AutoencoderKL(**TINY_VAE)
    if class_name == "ControlNetModel":
        keep = ("block_out_channels", "layers_per_block", "norm_num_groups", "cross_attention_dim", "attention_head_dim")
        return diffusers.ControlNetModel(**{k: TINY_UNET[k] for k in keep}, down_block_types=TINY_UNET["down_block_types"],
                                         conditioning_embedding_out_channels=(4, 8))
    if class_name == "UNet2DModel":
        return diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                     attention_head_dim=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    if class_name == "DiTTransformer2DModel":
        return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                               num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    if class_name == "UNet3DConditionModel":
        return diffusers.UNet3DConditionModel(in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                                              norm_num_groups=8, cross_attention_dim=8, attention_head_dim=8,
                                              down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                              up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    if class_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        return getattr(transformers, class_name)(transformers.CLIPTextConfig(**TINY_CLIP_TEXT))
    if class_name == "CLIPVisionModelWithProjection":
        return transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8,
            patch_size=4, projection_dim=8))
    if class_name == "CLIPModel":
        vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                      patch_size=4)
        return transformers.CLIPModel(transformers.CLIPConfig(text_config=TINY_CLIP_TEXT, vision_config=vision,
                                                              projection_dim=8))
    if class_name == "T5EncoderModel":
        return transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, relative_attention_num_buckets=8))
    if class_name == "T2IAdapter":
        return diffusers.T2IAdapter(in_channels=3, channels=(8, 16), num_res_blocks=1, downscale_factor=2)
    if class_name == "DPTForDepthEstimation":  # DPT-Hybrid (BiT + ViT), as SD 2 depth ships
        bit = dict(layer_type="bottleneck", global_padding="same", depths=[1, 1, 1], hidden_sizes=[8, 16, 32],
                   out_features=["stage1", "stage2", "stage3"], num_groups=2, embedding_size=8)
        return transformers.DPTForDepthEstimation(transformers.DPTConfig(
            image_size=32, patch_size=16, hidden_size=8, num_hidden_layers=2, backbone_out_indices=(0, 0, 0, 1),
            num_attention_heads=2, intermediate_size=16, is_hybrid=True, backbone_config=bit,
            backbone_featmap_shape=[1, 32, 2, 2], neck_hidden_sizes=[8, 16, 8, 8], fusion_hidden_size=8))
    if class_name == "PriorTransformer":
        return diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=8,
                                          num_embeddings=5)
    if class_name == "UnCLIPTextProjModel":
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

        return UnCLIPTextProjModel(clip_extra_context_tokens=2, clip_embeddings_dim=8, time_embed_dim=12,
                                   cross_attention_dim=6)
    raise KeyError(class_name)


def tiny_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over a six-entry vocabulary (no download)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def save_sd_pipeline(root: Path):
    """A tiny StableDiffusionPipeline written with save_pretrained; returns the pipeline."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=build("AutoencoderKL"), text_encoder=build("CLIPTextModel"),
        tokenizer=tiny_tokenizer(root.parent / "tok_src"), unet=build("UNet2DConditionModel"),
        scheduler=PNDMScheduler(steps_offset=1), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(root), safe_serialization=True)
    return pipe
