"""Every seam at once in the SD recipe: a ControlNet side network, an attention control and a LoRA patch,
composed as network transforms inside one compiled program whose scales are runtime values."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff import conditioning
from jaxdiff.models import attention_control as ac
from jaxdiff.models import patches
from jaxdiff.models._pure import PureModel
from jaxdiff.models.controlnet import ControlNetSide, controlnet_from_unet
from jaxdiff.models.unet import UNet2DConditionModel
from jaxdiff.pipelines import stable_diffusion as S

KW = dict(negative="c", steps=3, sampler="dpmpp_2m", seed=[3, 4], guidance=4.0, height=8, width=8, output="latent",
          mesh=None)
TARGETS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
           "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v")


def _pieces(sd):
    """A ControlNet copied from the U-Net with random (non-zero) zero convolutions, a control image, a LoRA."""
    unet = sd.models.unet.module()
    cn = controlnet_from_unet(unet, rngs=nnx.Rngs(0), conditioning_embedding_out_channels=(4, 8))
    rng = np.random.default_rng(0)
    graphdef, state = nnx.split(cn)
    state = jax.tree_util.tree_map(lambda v: np.asarray(rng.normal(0.0, 0.3, v.shape), v.dtype), state)
    cn = PureModel(state=state, graphdef=graphdef)
    image = rng.uniform(0.0, 1.0, (1, 8, 8, 3)).astype(np.float32)
    tensors = {}
    for t in TARGETS:
        tensors[f"unet.{t}.lora_A.weight"] = rng.normal(0, 0.5, (2, 8)).astype(np.float32)
        tensors[f"unet.{t}.lora_B.weight"] = rng.normal(0, 0.5, (8, 2)).astype(np.float32)
    return cn, image, patches.lora(tensors, sd.models.unet, prefix="unet.")


def _net(cn, image, lora, cn_scale, factor, lora_scale, max_length):
    factors = jnp.ones(max_length).at[1].set(factor)
    return conditioning.chain(
        conditioning.side_network(ControlNetSide(cn, image), cn_scale),
        ac.attention_control(ac.Reweight(factors, steps=(0, 2))),
        patches.patch_weights(lora, lora_scale, model=UNet2DConditionModel))


def test_controlnet_attention_control_and_lora_share_one_program(tiny_sd):
    cn, image, lora = _pieces(tiny_sd)
    plain = tiny_sd(["a b", "d"], **KW)
    neutral = tiny_sd(["a b", "d"], network_transform=_net(cn, image, lora, 0.0, 1.0, 0.0, tiny_sd.max_length), **KW)
    size = S.generate_latents_jit._cache_size()
    outs = {}
    for values in [(0.8, 1.0, 0.0), (0.0, 3.0, 0.0), (0.0, 1.0, 0.7), (0.8, 3.0, 0.7)]:
        outs[values] = tiny_sd(["a b", "d"], network_transform=_net(cn, image, lora, *values, tiny_sd.max_length),
                               **KW)
    assert S.generate_latents_jit._cache_size() == size  # new scales, factors and LoRA strengths: one program
    # switched off, the seams give the plain image (the explicit float32 softmax rounds differently from the kernel)
    np.testing.assert_allclose(neutral, plain, atol=1e-4 * np.abs(plain).max(), rtol=0)
    for values, out in outs.items():  # each seam alone, and all three, change the image
        assert np.abs(out - plain).max() > 1e-3 * np.abs(plain).max(), values
