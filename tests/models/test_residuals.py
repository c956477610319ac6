"""Residual injection (issue 9, item 2): the U-Net and ControlNet take one ``Residuals`` as diffusers adds
ControlNet and T2I-Adapter residuals; side networks compose as network transforms and their residuals sum.

References are diffusers' own models (rebuilt from the committed tiny fixtures' weights), its
``MultiControlNetModel`` and the residual handling of ``StableDiffusionControlNetPipeline``'s guess mode.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import conditioning as C
from jaxdiff import guidance as G
from jaxdiff._pytree import pytree_dataclass
from jaxdiff.conditioning import Residuals
from jaxdiff.models import controlnet, unet
from jaxdiff.models._pure import PureModel
from tests.models._convnet_cases import apply, assert_close, load_case, nchw, nhwc

# A plain down block with a downsampler first (SDXL's layout): its intra residual enters after downsampling.
UNET_PLAIN_FIRST = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=1, cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4,
)


@pytree_dataclass
class ResidualUNet:
    """``net(x, t, cond)``: the U-Net reading ``cond["context"]`` and the side networks' ``cond["residuals"]``."""

    unet: PureModel

    def __call__(self, x, t, cond):
        return self.unet(x, t, cond["context"], residuals=cond.get("residuals"))


# ---- diffusers references ----------------------------------------------------------------------------

def apply_cache_size() -> int:
    """Programs compiled by the shared jit of :func:`tests.models._convnet_cases.apply`."""
    from tests.models import _convnet_cases

    return _convnet_cases._JIT._cache_size()


def torch_model(cls_name: str, config: dict, weights: dict):
    import diffusers
    import torch

    model = getattr(diffusers, cls_name).from_config(config)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in weights.items()})
    return model.eval()


def numpy_weights(model) -> dict:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def t_(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32)))


def random_nchw(rng, shapes):
    return [0.5 * rng.standard_normal(s).astype(np.float32) for s in shapes]


def nhwc_tuple(xs):
    return tuple(jnp.asarray(nhwc(x)) for x in xs)


def unet_inputs():
    config, weights, io = load_case("unet_sd1")
    return config, weights, io["sample"], io["timesteps"], io["encoder_hidden_states"]


def controlnet_inputs():
    _, _, io = load_case("controlnet_sd1")
    return io["sample"], io["timesteps"], io["encoder_hidden_states"], io["controlnet_cond"]


# ---- the U-Net against diffusers ---------------------------------------------------------------------

# Skips of the tiny SD1 U-Net on 8x8 latents (conv_in, block 0 layer + downsampler, block 1 layer +
# downsampler, block 2 layer) and the T2I-Adapter feature shapes: inside cross-attention blocks 0 and
# 1 before downsampling, on the output of plain block 2, and one more on the mid-block output.
SD1_DOWN = [(2, 8, 8, 8), (2, 8, 8, 8), (2, 8, 4, 4), (2, 16, 4, 4), (2, 16, 2, 2), (2, 16, 2, 2)]
SD1_INTRA = [(2, 8, 8, 8), (2, 16, 4, 4), (2, 16, 2, 2), (2, 16, 2, 2)]
SD1_MID = (2, 16, 2, 2)
# Plain block 0 adds its feature after its downsampler (4x4), cross block 1 at 4x4, then the mid block.
PLAIN_FIRST_DOWN = [(2, 8, 8, 8), (2, 8, 8, 8), (2, 8, 4, 4), (2, 16, 4, 4)]
PLAIN_FIRST_INTRA = [(2, 8, 4, 4), (2, 16, 4, 4), (2, 16, 4, 4)]
PLAIN_FIRST_MID = (2, 16, 4, 4)


def diffusers_unet_out(tunet, sample, t, text, down=None, mid=None, intra=None):
    import torch

    kwargs = {}
    if down is not None:
        kwargs.update(down_block_additional_residuals=[t_(d) for d in down], mid_block_additional_residual=t_(mid))
    if intra is not None:
        kwargs["down_intrablock_additional_residuals"] = [t_(r) for r in intra]  # diffusers pops from this list
    with torch.no_grad():
        return tunet(t_(sample), t_(t), t_(text), **kwargs).sample.numpy()


@pytest.mark.parity
@pytest.mark.parametrize("case", ["sd1", "plain_first"])
def test_unet_with_controlnet_and_adapter_residuals_matches_diffusers(case):
    """Skip and mid residuals (ControlNet) plus intra-block features (T2I-Adapter, one on the mid block)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    config, weights, sample, t, text = unet_inputs()
    down_shapes, intra_shapes, mid_shape = SD1_DOWN, SD1_INTRA, SD1_MID
    if case == "plain_first":
        from tests.models.fixtures.make_unet import build

        tmodel = build("unet", UNET_PLAIN_FIRST, 21)
        config, weights = dict(tmodel.config), numpy_weights(tmodel)
        down_shapes, intra_shapes, mid_shape = PLAIN_FIRST_DOWN, PLAIN_FIRST_INTRA, PLAIN_FIRST_MID
    tunet = torch_model("UNet2DConditionModel", config, weights)
    rng = np.random.default_rng(0)
    down, intra = random_nchw(rng, down_shapes), random_nchw(rng, intra_shapes)
    (mid,) = random_nchw(rng, [mid_shape])
    want = diffusers_unet_out(tunet, sample, t, text, down, mid, intra)
    plain = diffusers_unet_out(tunet, sample, t, text)
    assert np.abs(want - plain).max() > 0.05  # the residuals matter

    # one Residuals with half the skip residuals, diffusers' keywords with the other half: they sum
    model = PureModel.of(unet.from_pretrained_tensors(config, weights))
    half = tuple(0.5 * d for d in nhwc_tuple(down))
    got = apply(model, nhwc(sample), t, text, residuals=Residuals(down=half, intra=nhwc_tuple(intra)),
                down_block_additional_residuals=half, mid_block_additional_residual=jnp.asarray(nhwc(mid)))
    assert_close(nchw(got), want)


def test_residual_count_and_shape_errors_name_what_is_expected():
    config, weights, sample, t, text = unet_inputs()
    model = unet.from_pretrained_tensors(config, weights)
    zeros = lambda shapes: tuple(jnp.zeros((s[0], s[2], s[3], s[1])) for s in shapes)  # noqa: E731
    call = lambda r: jax.eval_shape(lambda: model(nhwc(sample), t, text, residuals=r))  # noqa: E731
    with pytest.raises(ValueError, match=r"expected 6 down residuals, one per skip connection with shapes "
                                         r"\[\(2, 8, 8, 8\), .*intra"):
        call(Residuals(down=zeros(SD1_INTRA)))  # T2I-Adapter features passed as skips
    with pytest.raises(ValueError, match=r"expected 3 intra-block residuals, one per down block \(plus one for "
                                         r"the mid-block output\), got 2"):
        call(Residuals(intra=zeros(SD1_INTRA[:2])))
    bad = zeros(SD1_INTRA)
    bad = (bad[0], jnp.zeros((2, 8, 8, 16))) + bad[2:]
    with pytest.raises(ValueError, match=r"intra-block residual 1 \(cross-attention down block\): residual of shape "
                                         r"\(2, 8, 8, 16\) does not fit .* expected shape \(2, 4, 4, 16\)"):
        call(Residuals(intra=bad))
    with pytest.raises(ValueError, match=r"mid residual: .* expected shape \(2, 2, 2, 16\)"):
        call(Residuals(mid=jnp.zeros((2, 4, 4, 16))))
    # None entries skip a block; broadcasting residuals (pooled ControlNet) are accepted
    call(Residuals(intra=(None, None, jnp.zeros((2, 2, 2, 16))), mid=jnp.zeros((2, 1, 1, 16))))


# ---- ControlNet ------------------------------------------------------------------------------------

def jax_controlnet(config=None, weights=None):
    if config is None:
        config, weights, _ = load_case("controlnet_sd1")
    return PureModel.of(controlnet.from_pretrained_tensors(config, weights))


@pytest.mark.parity
def test_controlnet_given_residuals_treats_its_encoder_like_the_unets():
    """diffusers' ControlNet has no residual input: the reference adds them with hooks exactly where the
    U-Net's forward adds them (intra into the down blocks, down/mid before the zero convolutions)."""
    pytest.importorskip("torch")
    import torch

    config, weights, _ = load_case("controlnet_sd1")
    tcn = torch_model("ControlNetModel", config, weights)
    sample, t, text, image = controlnet_inputs()
    rng = np.random.default_rng(1)
    down, intra = random_nchw(rng, SD1_DOWN), random_nchw(rng, SD1_INTRA)
    (mid,) = random_nchw(rng, [SD1_MID])

    handles = []
    for i, block in enumerate(tcn.down_blocks):
        r = t_(intra[i])
        if getattr(block, "has_cross_attention", False):
            handles.append(block.register_forward_pre_hook(
                lambda m, a, kw, r=r: (a, {**kw, "additional_residuals": r}), with_kwargs=True))
        else:  # U-Net: `sample += r` on the block output, which is also its last skip
            handles.append(block.register_forward_hook(
                lambda m, a, out, r=r: (out[0] + r, out[1][:-1] + (out[0] + r,))))
    handles.append(tcn.mid_block.register_forward_hook(lambda m, a, out: out + t_(intra[-1])))
    for j, conv in enumerate(tcn.controlnet_down_blocks):
        handles.append(conv.register_forward_pre_hook(lambda m, a, r=t_(down[j]): (a[0] + r,)))
    handles.append(tcn.controlnet_mid_block.register_forward_pre_hook(lambda m, a: (a[0] + t_(mid),)))
    with torch.no_grad():
        want_down, want_mid = tcn(t_(sample), t_(t), t_(text), controlnet_cond=t_(image), conditioning_scale=0.7,
                                  return_dict=False)
    for h in handles:
        h.remove()

    res = apply(jax_controlnet(), nhwc(sample), t, text, nhwc(image), np.float32(0.7),
                residuals=Residuals(down=nhwc_tuple(down), mid=jnp.asarray(nhwc(mid)), intra=nhwc_tuple(intra)))
    plain = apply(jax_controlnet(), nhwc(sample), t, text, nhwc(image), np.float32(0.7))
    assert float(jnp.abs(res.mid - plain.mid).max()) > 0.05
    for got, want in zip(res.down, want_down):
        assert_close(nchw(got), want.numpy())
    assert_close(nchw(res.mid), want_mid.numpy())


# ---- side networks --------------------------------------------------------------------------------

@pytest.mark.parity
def test_two_controlnets_as_side_networks_sum_like_diffusers_multicontrolnet():
    pytest.importorskip("torch")
    import torch
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from tests.models.fixtures.make_unet import CONTROLNET_SD1, build

    unet_config, unet_weights, _ = load_case("unet_sd1")
    cn_config, cn_weights, _ = load_case("controlnet_sd1")
    other = build("controlnet", CONTROLNET_SD1, 31)  # a second ControlNet, other weights
    sample, t, text, image = controlnet_inputs()
    image2 = np.random.default_rng(2).standard_normal(image.shape).astype(np.float32)
    scales = (0.7, 1.3)

    tunet = torch_model("UNet2DConditionModel", unet_config, unet_weights)
    multi = MultiControlNetModel([torch_model("ControlNetModel", cn_config, cn_weights), other.eval()])
    with torch.no_grad():
        down, mid = multi(t_(sample), t_(t), t_(text), controlnet_cond=[t_(image), t_(image2)],
                          conditioning_scale=list(scales), return_dict=False)
    want = diffusers_unet_out(tunet, sample, t, text, [d.numpy() for d in down], mid.numpy())

    model = PureModel.of(unet.from_pretrained_tensors(unet_config, unet_weights))
    cn1, cn2 = jax_controlnet(), jax_controlnet(dict(other.config), numpy_weights(other))

    def controlled(scale1, scale2, img1=nhwc(image)):
        return C.apply(ResidualUNet(model), C.side_network(controlnet.ControlNetSide(cn1, img1), scale1),
                       C.side_network(controlnet.ControlNetSide(cn2, nhwc(image2)), scale2))

    x, cond = nhwc(sample), {"context": jnp.asarray(text)}
    got = apply(controlled(*scales), x, t, cond)
    assert_close(nchw(got), want)
    # changing a side network's scale (any spelling) or its image compiles nothing new
    compiled = apply_cache_size()
    changed = [apply(controlled(*args), x, t, cond) for args in
               [(0.2, scales[1]), (np.float32(0.2), 2), (jnp.asarray(0.9), 2.0), (0.9, 2.0, -nhwc(image))]]
    assert apply_cache_size() == compiled
    for a, b in zip([got] + changed[:-1], changed):
        assert float(jnp.abs(a - b).max()) > 1e-3  # every change took effect
    r1 = apply(cn1, x, t, text, nhwc(image), np.float32(scales[0]))
    r2 = apply(cn2, x, t, text, nhwc(image2), np.float32(scales[1]))
    assert float(jnp.abs(r2.mid).max()) > 0.05  # the second ControlNet contributes
    np.testing.assert_allclose(np.asarray(got), np.asarray(apply(model, x, t, text, residuals=r1 + r2)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parity
def test_guess_mode_is_a_conditional_only_side_network_inside_classifier_free_guidance():
    """diffusers' guess mode runs the ControlNet on the conditional half only (logspace scales) and gives
    the unconditional half zero residuals; here the ControlNet runs on both halves and
    ``conditional_only`` zeroes the unconditional half through ``cond["conditional"]``."""
    pytest.importorskip("torch")
    import torch

    unet_config, unet_weights, _ = load_case("unet_sd1")
    cn_config, cn_weights, _ = load_case("controlnet_sd1")
    sample, t, text, image = controlnet_inputs()
    uncond = np.random.default_rng(3).standard_normal(text.shape).astype(np.float32)
    w, s = 5.0, 0.8

    tunet = torch_model("UNet2DConditionModel", unet_config, unet_weights)
    tcn = torch_model("ControlNetModel", cn_config, cn_weights)
    with torch.no_grad():  # StableDiffusionControlNetPipeline, guess_mode=True with classifier-free guidance
        down, mid = tcn(t_(sample), t_(t), t_(text), controlnet_cond=t_(image), conditioning_scale=s,
                        guess_mode=True, return_dict=False)
        down = [torch.cat([torch.zeros_like(d), d]) for d in down]
        mid = torch.cat([torch.zeros_like(mid), mid])
        eps = tunet(torch.cat([t_(sample)] * 2), torch.cat([t_(t)] * 2), torch.cat([t_(uncond), t_(text)]),
                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        eps_u, eps_c = eps.chunk(2)
        want = (eps_u + w * (eps_c - eps_u)).numpy()
        # the same control on both halves (conditional_only ignored) is another result
        both = tcn(torch.cat([t_(sample)] * 2), torch.cat([t_(t)] * 2), torch.cat([t_(uncond), t_(text)]),
                   controlnet_cond=torch.cat([t_(image)] * 2), conditioning_scale=s, guess_mode=True,
                   return_dict=False)
        eps = tunet(torch.cat([t_(sample)] * 2), torch.cat([t_(t)] * 2), torch.cat([t_(uncond), t_(text)]),
                    down_block_additional_residuals=both[0], mid_block_additional_residual=both[1]).sample
        eps_u, eps_c = eps.chunk(2)
        assert np.abs((eps_u + w * (eps_c - eps_u)).numpy() - want).max() > 0.05

    model, cn = PureModel.of(unet.from_pretrained_tensors(unet_config, unet_weights)), jax_controlnet()
    b = sample.shape[0]
    side = C.side_network(controlnet.ControlNetSide(cn, nhwc(image), guess_mode=True), s, conditional_only=True)
    # the network as the "denoiser" (sigma = t): classifier-free guidance combines its outputs
    den = G.apply(C.apply(ResidualUNet(model), side),
                  G.classifier_free(w, {"context": jnp.asarray(uncond), C.CONDITIONAL: jnp.zeros(b)}))
    got = apply(den, nhwc(sample), jnp.asarray(t), {"context": jnp.asarray(text), C.CONDITIONAL: jnp.ones(b)})
    assert_close(nchw(got), want)
