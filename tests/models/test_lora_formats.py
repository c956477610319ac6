"""LoRA file formats: LyCORIS LoHa / LoKr deltas and PEFT's metadata scales, against peft's own layers.

Truth: peft 0.21's ``LoHaLayer`` / ``LoKrLayer`` / ``LoraLayer.get_delta_weight`` on tiny torch layers with
random factors; the file tensors are those layers' parameters under LyCORIS's names.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert.torch_layout import to_jax_layout
from jaxdiff.models import lora_formats as F
from jaxdiff.models import patches

pytestmark = pytest.mark.parity
LIN, CONV = (12, 16), (4, 6, 3)  # Linear in -> out; Conv in -> out, k x k


class _Jax(nnx.Module):
    def __init__(self):
        self.lin = nnx.Linear(*LIN, rngs=nnx.Rngs(0))
        self.conv = nnx.Conv(CONV[0], CONV[1], (CONV[2], CONV[2]), rngs=nnx.Rngs(0))


def _torch_layers(config):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(*LIN)
            self.conv = torch.nn.Conv2d(CONV[0], CONV[1], CONV[2])

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "default" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return {m: model.base_model.model.get_submodule(m) for m in ("lin", "conv")}


def _file(layers, prefixes: tuple[str, ...], alpha: float) -> dict[str, np.ndarray]:
    """The layers' factors under LyCORIS's names (``lin.hada_w1_a``...), with the alpha every module shares."""
    out = {}
    for module, layer in layers.items():
        for name, p in layer.named_parameters():
            role, _, adapter = name.partition(".")
            if role.startswith(prefixes) and adapter == "default":
                out[f"{module}.{role}"] = p.detach().numpy().copy()
        out[f"{module}.alpha"] = np.float32(alpha)
    return out


def _check(layers, file: dict, style: str) -> None:
    patch = patches.lora(file, _Jax())
    assert not patch.low_rank and sorted(patch.full) == ["conv.kernel", "lin.kernel"]
    for module, layer in layers.items():
        want = layer.get_delta_weight("default").detach().numpy()
        got = np.asarray(patch.full[f"{module}.kernel"])
        np.testing.assert_allclose(got, to_jax_layout(want, "kernel"), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{style} {module}")
        assert np.abs(want).max() > 0.1


@pytest.mark.parametrize("effective_conv", [False, True])
def test_loha_deltas_equal_peft_loha_layers(effective_conv):
    """LoHa: (w1a w1b) * (w2a w2b) * alpha / r on a Linear and a 3x3 Conv, plain or in Tucker form."""
    from peft import LoHaConfig

    layers = _torch_layers(LoHaConfig(r=2, alpha=3.0, target_modules=["lin", "conv"],
                                      use_effective_conv2d=effective_conv))
    file = _file(layers, ("hada_",), 3.0)
    assert "lin.hada_w2_b" in file and "lin.hada_t1" not in file and ("conv.hada_t1" in file) == effective_conv
    _check(layers, file, "loha")


@pytest.mark.parametrize("effective_conv", [False, True])
def test_lokr_deltas_equal_peft_lokr_layers(effective_conv):
    """LoKr: kron(w1, w2) * alpha / r with factored factors (at these sizes peft factors at r = 1); the conv's w2
    plain or in Tucker form."""
    from peft import LoKrConfig

    layers = _torch_layers(LoKrConfig(r=1, alpha=5.0, target_modules=["lin", "conv"], decompose_both=True,
                                      use_effective_conv2d=effective_conv))
    file = _file(layers, ("lokr_",), 5.0)
    assert "lin.lokr_w1_a" in file and ("conv.lokr_t2" in file) == effective_conv
    _check(layers, file, "lokr")


def test_lokr_with_full_factors_has_scale_one_and_loha_keeps_shapes():
    """LyCORIS: when neither Kronecker factor is factored the scale is 1 whatever the alpha; a LoHa whose
    delta has the wrong size names the layer."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 3)), rng.standard_normal((4, 4))  # kron: (16, 12) = Linear 12 -> 16
    file = {"lin.lokr_w1": w1, "lin.lokr_w2": w2, "lin.alpha": np.float32(7.0)}
    got = np.asarray(patches.lora(file, _Jax()).full["lin.kernel"])
    want = np.einsum("ab,cd->acbd", w1, w2).reshape(16, 12).T  # kron written out, Linear (out, in) -> (in, out)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    bad = {"lin.hada_w1_a": np.ones((16, 2)), "lin.hada_w1_b": np.ones((2, 11)), "lin.hada_w2_a": np.ones((16, 2)),
           "lin.hada_w2_b": np.ones((2, 11))}
    with pytest.raises(patches.PatchMismatchError, match=r"lin: the LoHa delta has \(16, 11\)"):
        patches.lora(bad, _Jax())


def test_peft_metadata_alphas_equal_peft_lora_scaling():
    """diffusers' lora_adapter_metadata (the LoraConfig): lora_alpha, alpha_pattern and rsLoRA's alpha / sqrt(r)
    give the scales peft's own layers use."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig

    for rslora in (False, True):
        config = LoraConfig(r=4, lora_alpha=3.0, alpha_pattern={"conv": 10.0}, rank_pattern={"conv": 2},
                            target_modules=["lin", "conv"], use_rslora=rslora, init_lora_weights=False)
        layers = _torch_layers(config)
        file = {}
        for module, layer in layers.items():
            file[f"unet.{module}.lora_A.weight"] = layer.lora_A["default"].weight.detach().numpy()
            file[f"unet.{module}.lora_B.weight"] = layer.lora_B["default"].weight.detach().numpy()
        meta = {F.METADATA_KEY: json.dumps({f"unet.{k}": (sorted(v) if isinstance(v, set) else v)
                                            for k, v in config.to_dict().items()}, default=str)}
        alpha = F.alpha_rule(F.peft_configs(meta)["unet"])
        patch = patches.lora(file, _Jax(), prefix="unet.", alpha=alpha)
        for module, layer in layers.items():
            want = layer.get_delta_weight("default").detach().numpy()
            np.testing.assert_allclose(np.asarray(patch.low_rank[f"{module}.kernel"].delta()),
                                       to_jax_layout(want, "kernel"), rtol=1e-5, atol=1e-6, err_msg=module)
        assert torch.is_tensor(layers["lin"].lora_A["default"].weight)


def test_older_diffusers_names_target_the_same_layers():
    """``attn1.processor.to_q_lora`` is ``attn1.to_q``, ``to_out_lora`` ``to_out.0``, CLIP's ``self_attn.to_k_lora``
    ``self_attn.k_proj``; ``lora_linear_layer`` and ``lora.down`` pairs are LoRA pairs."""
    names = {"a.attn1.processor.to_q_lora": "a.attn1.to_q", "a.attn2.processor.to_out_lora": "a.attn2.to_out.0",
             "t.layers.0.self_attn.to_k_lora": "t.layers.0.self_attn.k_proj",
             "t.layers.0.self_attn.to_out_lora": "t.layers.0.self_attn.out_proj",
             "t.layers.0.mlp.fc1": "t.layers.0.mlp.fc1", "a.attn1.to_q": "a.attn1.to_q"}
    for old, new in names.items():
        assert F.normalize_module(old) == new
    assert F.split_role("x.mlp.fc1.lora_linear_layer.down.weight") == ("x.mlp.fc1", "down")
    assert F.split_role("x.proj_in.lora.up.weight") == ("x.proj_in", "up")
    assert F.split_role("lora_unet_x_to_q.alpha") == ("lora_unet_x_to_q", "alpha")
    assert F.split_role("x.lora_magnitude_vector") is None and F.unsupported("x.dora_scale")
