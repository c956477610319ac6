"""The full CLIP model (both towers, projections, logit scale) against transformers' ``CLIPModel``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert import load_model_folder
from jaxdiff.convert.torch_layout import CheckpointMismatchError, abstract, count_params
from jaxdiff.models._pure import PureModel
from jaxdiff.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from tests.models._textdit_cases import DATA, fx

VOCAB, LENGTH, IMAGE = 64, 12, 16
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
            pad_token_id=VOCAB - 1)
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE,
              patch_size=4, hidden_act="gelu")


def tiny_torch_clip(seed: int = 0, logit_scale: float = 2.6592):
    """A tiny transformers ``CLIPModel`` whose every parameter is perturbed (norms, biases exercised)."""
    import torch
    import transformers

    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=20,
                                  logit_scale_init_value=logit_scale)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def clip_inputs(n_text: int = 3, n_image: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (BOS, words, EOS, EOS padding) and NCHW pixels."""
    rng = np.random.default_rng(seed)
    ids = np.full((n_text, LENGTH), VOCAB - 1, np.int64)
    ids[:, 0] = VOCAB - 2
    for i in range(n_text):
        n = 3 + 2 * i
        ids[i, 1:1 + n] = rng.integers(0, VOCAB - 2, n)
    return ids, rng.standard_normal((n_image, 3, IMAGE, IMAGE)).astype(np.float32)


@jax.jit
def _outputs(model: PureModel, ids, pixels):
    m = model.module()
    out = m(ids, pixels)
    return {"text_features": m.get_text_features(ids), "image_features": m.get_image_features(pixels),
            "logits_per_image": out.logits_per_image, "logits_per_text": out.logits_per_text,
            "text_embeds": out.text_embeds, "image_embeds": out.image_embeds}


def torch_outputs(model, ids: np.ndarray, pixels: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        t_ids, t_px = torch.from_numpy(ids), torch.from_numpy(pixels)
        out = model(input_ids=t_ids, pixel_values=t_px)
        ref = {"text_features": model.get_text_features(t_ids).pooler_output,
               "image_features": model.get_image_features(t_px).pooler_output,
               "logits_per_image": out.logits_per_image, "logits_per_text": out.logits_per_text,
               "text_embeds": out.text_embeds, "image_embeds": out.image_embeds}
    return {k: v.numpy() for k, v in ref.items()}


def assert_close(got, want, name: str, tol: float = 1e-5) -> None:
    """max |got - want| <= tol * max(1, max |want|)."""
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    assert err <= tol * max(1.0, float(np.abs(want).max())), f"{name}: max abs diff {err:.3g}"


@pytest.mark.parity
def test_clip_model_matches_transformers(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    ref = tiny_torch_clip()
    ref.save_pretrained(tmp_path)
    model = load_model_folder(tmp_path)  # config.json names CLIPModel: the registry resolves it
    assert isinstance(model, CLIPModel)
    assert model.config.projection_dim == 20 and model.config.text_config.eos_token_id == VOCAB - 1
    ids, pixels = clip_inputs(n_text=3, n_image=2)
    want = torch_outputs(ref, ids, pixels)
    got = _outputs(PureModel.of(model), jnp.asarray(ids), jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        assert_close(got[name], value, name)
    assert got["logits_per_image"].shape == (2, 3)


def test_config_round_trip_and_parameter_count():
    """``CLIPConfig.to_dict`` reads back to the same config; the count is both towers + 2 projections + 1."""
    cfg = CLIPConfig(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=8),
                     CLIPVisionConfig(hidden_size=12, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=8, patch_size=4), projection_dim=6, logit_scale_init_value=1.5)
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    model = abstract(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0)))
    from jaxdiff.models.clip import CLIPTextModel, CLIPVisionModelWithProjection

    text = count_params(abstract(lambda: CLIPTextModel(cfg.text_config, rngs=nnx.Rngs(0))))
    vision = count_params(abstract(lambda: CLIPVisionModelWithProjection(cfg.vision_config, rngs=nnx.Rngs(0))))
    # the vision count includes its projection to vision_config.projection_dim (512 by default)
    assert count_params(model) == text + vision - 12 * 512 + 12 * 6 + 16 * 6 + 1
    with pytest.raises(ValueError, match="text_config"):
        CLIPConfig.from_dict({"vision_config": {}})


@pytest.mark.parity
def test_full_size_count_matches_transformers_meta():
    """openai/clip-vit-base-patch32's shape (transformers' defaults): 151,277,313 parameters."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ref = transformers.CLIPModel(transformers.CLIPConfig())
    want = sum(p.numel() for p in ref.parameters())
    assert count_params(abstract(lambda: CLIPModel(CLIPConfig(), rngs=nnx.Rngs(0)))) == want == 151_277_313


def test_missing_tower_is_reported():
    """A text-only file (e.g. a CLIPTextModel's weights) is refused by CLIPModel, naming the missing tower."""
    config, tensors, _, _ = fx.load_case(DATA / "clip_text_gelu")  # transformers' CLIPTextModelWithProjection
    full = {"text_config": config, "vision_config": {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "image_size": 8, "patch_size": 4},
            "projection_dim": config["projection_dim"]}
    own = ("text_model.", "text_projection.")
    tensors = {k if k.startswith(own) else f"text_model.{k}": v for k, v in tensors.items()}
    with pytest.raises(CheckpointMismatchError, match=r"missing from checkpoint \(\d+\): logit_scale, vision_model"):
        CLIPModel.from_pretrained_tensors(full, tensors)
