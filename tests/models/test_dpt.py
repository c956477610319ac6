"""DPT (hybrid BiT + ViT, and plain ViT) equals transformers' DPTForDepthEstimation on tiny random configs; the
torch-interpolation matrices equal torch; the preprocessing equals transformers' DPTImageProcessor."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from jaxdiff.convert.folders import load_model_folder  # noqa: E402
from jaxdiff.models import dpt  # noqa: E402
from jaxdiff.models._pure import PureModel  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4

BIT = dict(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], embedding_dynamic_padding=True,
           out_features=["stage1", "stage2", "stage3"], hidden_sizes=[8, 16, 32], num_groups=2, embedding_size=8)
HYBRID = dict(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=4, backbone_out_indices=(0, 1, 2, 3),
              num_attention_heads=2, intermediate_size=20, is_hybrid=True, backbone_config=BIT,
              backbone_featmap_shape=[1, 32, 2, 2], neck_hidden_sizes=[8, 16, 16, 16],
              reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=16)
VIT = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=4, backbone_out_indices=(0, 1, 2, 3),
           num_attention_heads=2, intermediate_size=20, neck_hidden_sizes=[8, 8, 16, 16],
           reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=16)


def _saved(tmp_path, **config):
    """A random transformers DPTForDepthEstimation (weights perturbed off their zero / one inits) saved as a folder."""
    torch.manual_seed(0)
    model = transformers.DPTForDepthEstimation(transformers.DPTConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    return model, load_model_folder(tmp_path)


@jax.jit
def _run(model, pixels):
    return model(pixels)


def _compare(model, ours, size: int) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        ref = model(x).predicted_depth.numpy()
    out = np.asarray(_run(PureModel.of(ours), x.permute(0, 2, 3, 1).numpy()))
    assert out.shape == ref.shape
    assert ref.std() > 1e-3
    np.testing.assert_allclose(out, ref, atol=TOL * max(1.0, np.abs(ref).max()), rtol=0)


def test_hybrid_dpt_folder_matches_transformers(tmp_path):
    """Images -> DPTImageProcessor -> DPT-Hybrid, against jaxdiff's preprocessing and network (through the
    depth-to-image pipeline's ``estimate_depth``, the way SD 2 depth uses them)."""
    from PIL import Image

    from jaxdiff.pipelines.depth2img import StableDiffusionDepth

    model, ours = _saved(tmp_path, **HYBRID)
    assert isinstance(ours, dpt.DPTForDepthEstimation) and ours.config.is_hybrid
    proc = transformers.DPTImageProcessor(size={"height": 32, "width": 32})
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)) for _ in range(2)]
    with torch.no_grad():
        ref = model(proc(images=images, return_tensors="pt").pixel_values).predicted_depth.numpy()
    out = StableDiffusionDepth(None, PureModel.of(ours), dpt.DPTProcessorConfig.from_dict(proc.to_dict()))
    out = out.estimate_depth(images)
    assert out.shape == ref.shape == (2, 32, 32) and ref.std() > 1e-3
    np.testing.assert_allclose(out, ref, atol=TOL * max(1.0, np.abs(ref).max()), rtol=0)
    with pytest.raises(ValueError, match="reads 32x32 images"):
        jax.eval_shape(_run, PureModel.of(ours), np.zeros((1, 48, 48, 3), np.float32))


def test_vit_dpt_matches_transformers_at_another_size(tmp_path):
    """Plain ViT DPT (dpt-large's layout, readout "project") at 48 px, which resizes the 32 px position embeddings.
    (The "add" and "ignore" readouts differ by one line each; left out to keep the suite fast.)"""
    model, ours = _saved(tmp_path, **VIT)
    assert not ours.config.is_hybrid
    _compare(model, ours, 48)


@pytest.mark.parametrize("mode,align", [("bilinear", False), ("bilinear", True), ("bicubic", False)])
@pytest.mark.parametrize("n_in,n_out", [(5, 13), (24, 7), (8, 8)])
def test_resize_matrix_equals_torch_interpolate(mode, align, n_in, n_out):
    x = np.random.default_rng(n_in).standard_normal((1, 1, n_in, n_in + 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(n_out, n_out + 2), mode=mode,
                                          align_corners=align).numpy()[0, 0]
    out = dpt.resize_matrix(n_in, n_out, mode, align) @ x[0, 0] @ dpt.resize_matrix(n_in + 3, n_out + 2, mode, align).T
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(size={"height": 32, "width": 32}),
                                    dict(size={"height": 32, "width": 32}, keep_aspect_ratio=True,
                                         ensure_multiple_of=8),
                                    dict(size={"height": 24, "width": 40}, resample=2, do_pad=True, size_divisor=16,
                                         image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4])])
def test_preprocess_matches_dpt_image_processor(kwargs):
    from PIL import Image

    proc = transformers.DPTImageProcessor(**kwargs)
    rng = np.random.default_rng(1)
    for hw in [(32, 32), (40, 56)]:
        images = [Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)) for _ in range(2)]
        ref = proc(images=images, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
        out = dpt.preprocess(images, proc.to_dict())
        assert out.shape == ref.shape
        # transformers without torchvision runs its PIL backend (exact); its torchvision one is within a grey level
        np.testing.assert_allclose(out, ref, atol=1e-5 if "Pil" in type(proc).__name__ else 2.5 / 255 / 0.2, rtol=0)


def test_unsupported_configs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="readout_type='project'"):
        dpt.DPTConfig.from_dict({**HYBRID, "readout_type": "add"})
    with pytest.raises(ValueError, match="distinct ViT layers"):
        dpt.DPTConfig.from_dict({**VIT, "backbone_out_indices": [0, 1, 1, 2]})
    with pytest.raises(ValueError, match="batch_norm"):
        dpt.DPTConfig.from_dict({**VIT, "use_batch_norm_in_fusion_residual": True})
    with pytest.raises(ValueError, match="bottleneck"):
        dpt.DPTConfig.from_dict({**HYBRID, "backbone_config": {**BIT, "layer_type": "preactivation"}})
    with pytest.raises(ValueError, match="do_center_crop"):
        dpt.preprocess(np.zeros((8, 8, 3), np.float32), {"do_center_crop": True})
