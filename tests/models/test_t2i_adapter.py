"""T2IAdapter / MultiAdapter against diffusers 0.42 (full and light adapters, even and odd sizes), folder loading,
and the control-image checks."""
from __future__ import annotations

import numpy as np
import pytest

from jaxdiff.convert.folders import load_model_folder
from jaxdiff.models import t2i_adapter as T
from tests.models._convnet_cases import assert_close, nchw

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.parity

FULL = dict(in_channels=3, channels=[8, 16, 16], num_res_blocks=2, downscale_factor=4, adapter_type="full_adapter")
LIGHT = dict(in_channels=1, channels=[8, 16], num_res_blocks=2, downscale_factor=4, adapter_type="light_adapter")
# 32x32: every stage halves evenly; 20x28: 5x7 -> 3x4 -> 2x2, the ceil-mode average pool's partial windows
SIZES = [(32, 32), (20, 28)]


def _reference(config: dict, seed: int):
    torch.manual_seed(seed)
    model = diffusers.T2IAdapter(**config).eval()
    with torch.no_grad():  # diffusers' default init leaves the features small; widen them so errors show
        for p in model.parameters():
            p.mul_(2.0)
    return model


def _saved(config: dict, seed: int, folder):
    ref = _reference(config, seed)
    ref.save_pretrained(str(folder), safe_serialization=True)
    return ref, load_model_folder(folder)


def _ref_features(ref, image: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [f.numpy() for f in ref(torch.from_numpy(np.ascontiguousarray(nchw(image))))]


@pytest.mark.parametrize("config", [FULL, LIGHT], ids=["full", "light"])
def test_adapter_features_match_diffusers(config, tmp_path):
    ref, model = _saved(config, 0, tmp_path / "adapter")
    assert isinstance(model, T.T2IAdapter)  # load_model_folder read _class_name "T2IAdapter"
    assert model.config.total_downscale_factor == ref.total_downscale_factor
    rng = np.random.default_rng(1)
    for h, w in SIZES:
        image = rng.uniform(0, 1, (2, h, w, config["in_channels"])).astype(np.float32)
        expected = _ref_features(ref, image)
        got = T.adapter_features(model, image)
        assert len(got) == len(expected) == model.config.num_features
        for g, e in zip(got, expected):
            assert float(np.abs(e).max()) > 0.1
            assert_close(nchw(g), e)


def test_multi_adapter_matches_diffusers(tmp_path):
    ref_a, a = _saved(FULL, 2, tmp_path / "a")
    ref_b, b = _saved({**LIGHT, "in_channels": 3}, 3, tmp_path / "b")
    rng = np.random.default_rng(4)
    images = [rng.uniform(0, 1, (1, 32, 32, 3)).astype(np.float32) for _ in range(2)]
    ref = diffusers.MultiAdapter([ref_a, ref_b])
    ref.save_pretrained(str(tmp_path / "multi"), safe_serialization=True)  # writes multi, multi_1
    multi = T.load_multi_adapter(tmp_path / "multi")
    assert len(multi.adapters) == 2
    for weights in ([0.7, 0.4], None):
        with torch.no_grad():
            expected = ref([torch.from_numpy(np.ascontiguousarray(nchw(im))) for im in images], weights)
        got = multi([np.asarray(im) for im in images], weights)
        for g, e in zip(got, expected):
            assert_close(nchw(g), e.numpy())
    # the transform's features are the same weighted sum, kept per adapter so the weights stay traced
    side = T.t2i_adapter([a, b], images, [0.7, 0.4]).params["side"]
    x = np.zeros((2, 8, 8, 4), np.float32)
    intra = side(x, 0.0, {}).intra
    with torch.no_grad():
        expected = ref([torch.from_numpy(np.ascontiguousarray(nchw(im))) for im in images], [0.7, 0.4])
    for g, e in zip(intra, expected):
        assert g.shape[0] == 2  # tiled over the network batch
        assert_close(nchw(g[:1]), e.numpy())
        assert_close(nchw(g[1:]), e.numpy())


def test_bad_control_images_are_one_clear_error(tmp_path):
    _, model = _saved(FULL, 0, tmp_path / "adapter")
    with pytest.raises(ValueError, match="3 channel"):
        T.adapter_features(model, np.zeros((1, 32, 32, 1), np.float32))
    with pytest.raises(ValueError, match="multiples of 4"):
        T.adapter_features(model, np.zeros((1, 30, 32, 3), np.float32))
    feats = T.adapter_features(model, np.zeros((1, 32, 32, 3), np.float32))
    side = T.t2i_adapter(model, np.zeros((1, 32, 32, 3), np.float32)).params["side"]
    with pytest.raises(ValueError, match=r"control image of the generated image's size \(48x48 pixels\)"):
        side(np.zeros((2, 12, 12, 4), np.float32), 0.0, {})
    with pytest.raises(ValueError, match="one conditioning scale, or one per adapter"):
        T.t2i_adapter([feats, feats], scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="unsupported adapter_type"):
        T.T2IAdapterConfig.from_dict({**FULL, "adapter_type": "full_adapter_xl"})
