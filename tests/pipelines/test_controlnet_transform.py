"""ControlNet as a network transform of the SD recipe: runtime values share one program; bad input fails clearly."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from jaxdiff.models._pure import PureModel
from jaxdiff.models.controlnet import (
    ControlNetConfig, ControlNetModel, controlnet, controlnet_from_unet, interval_keep,
)
from jaxdiff.conditioning import StepIndex
from jaxdiff.pipelines import stable_diffusion as S
from jaxdiff.pipelines.controlnet import controlnet_transform, prepare_control_image

KW = dict(negative="c", steps=4, sampler="dpmpp_2m", seed=[3, 4], guidance=4.0, height=8, width=8, output="latent",
          mesh=None)
PROMPTS = ["a b", "d"]


def _net(sd, seed: int) -> PureModel:
    """A ControlNet copied from the tiny U-Net, every weight (zero convolutions too) drawn at random."""
    cn = controlnet_from_unet(sd.models.unet.module(), rngs=nnx.Rngs(seed), conditioning_embedding_out_channels=(4, 8))
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(cn)
    state = jax.tree_util.tree_map(lambda v: np.asarray(rng.normal(0.0, 0.3, v.shape), v.dtype), state)
    return PureModel(state=state, graphdef=graphdef)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (8, 8, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def nets(tiny_sd):
    return [_net(tiny_sd, 1), _net(tiny_sd, 2)]


def test_interval_keep_is_diffusers_controlnet_keep():
    """diffusers: keep = 1 - (i / n < start or (i + 1) / n > end), i counted over the steps that run."""
    starts, ends = np.array([0.0, 0.3, 0.25], np.float32), np.array([0.6, 1.0, 0.75], np.float32)
    for first, count in ((0, 5), (2, 6), (0, 4)):
        n = count - first
        for step in range(first, count):
            i = step - first
            want = [1.0 - float(i / n < s or (i + 1) / n > e) for s, e in ((0.0, 0.6), (0.3, 1.0), (0.25, 0.75))]
            got = interval_keep(StepIndex(step, first, count), starts, ends)
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"step {step} of [{first}, {count})")


def test_scales_intervals_images_steps_and_strength_compile_nothing_new(tiny_sd, nets):
    def run(images=(_image(0), _image(1)), scale=(1.0, 0.5), start=(0.0, 0.25), end=(0.75, 1.0), guess=False, **kw):
        cn = controlnet_transform(tiny_sd, nets, list(images), height=8, width=8, scale=list(scale), start=list(start),
                                  end=list(end), guess_mode=guess)
        return tiny_sd(PROMPTS, network_transform=cn, **{**KW, **kw})

    S.generate_latents_jit.clear_cache()  # count this test's programs, whatever other files compiled
    first = run()
    size = S.generate_latents_jit._cache_size()
    changed = [run(scale=(0.3, 0.5)), run(start=(0.5, 0.25)), run(end=(0.75, 0.5)), run(images=(_image(2), _image(1))),
               run(steps=6)]
    assert S.generate_latents_jit._cache_size() == size
    for k, out in enumerate(changed):
        assert np.abs(out - first).max() > 1e-4 * np.abs(first).max(), k
    guess = run(guess=True)  # guess mode itself is a static switch: one more program, once
    assert S.generate_latents_jit._cache_size() == size + 1
    guess_weaker = run(guess=True, scale=(0.4, 0.2))
    assert S.generate_latents_jit._cache_size() == size + 1
    assert np.abs(guess - guess_weaker).max() > 1e-4 * np.abs(guess).max()
    image = np.full((2, 8, 8, 3), 0.5, np.float32)
    a = run(image=image, strength=0.5, steps=4)
    b = run(image=image, strength=0.8, steps=5, start=(0.2, 0.0))
    assert S.generate_latents_jit._cache_size() == size + 2  # image-to-image: one more program, once
    assert np.abs(a - b).max() > 1e-4 * np.abs(a).max()


def test_zero_scale_or_an_empty_interval_is_the_plain_model(tiny_sd, nets):
    plain = tiny_sd(PROMPTS, **KW)
    off = controlnet_transform(tiny_sd, nets, [_image(0), _image(1)], height=8, width=8, scale=[0.0, 1.0],
                               start=[0.0, 0.9], end=[1.0, 1.0])  # net 1's interval [0.9, 1] holds none of 4 steps
    np.testing.assert_allclose(tiny_sd(PROMPTS, network_transform=off, **KW), plain, atol=1e-5, rtol=0)


def test_bad_input_fails_with_the_fix(tiny_sd, nets):
    two = [_image(0), _image(1)]
    with pytest.raises(ValueError, match="got 1 control images for 2 ControlNets; give a list with one control image"):
        controlnet_transform(tiny_sd, nets, [_image(0)], height=8, width=8)
    with pytest.raises(ValueError, match="got 3 conditioning scales for 2 ControlNets; give one value, or one per"):
        controlnet_transform(tiny_sd, nets, two, height=8, width=8, scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="ControlNet 1: the active interval needs 0 <= start < end <= 1, got start "
                                         "0.5 and end 0.5; give control_guidance_start below control_guidance_end"):
        controlnet_transform(tiny_sd, nets, two, height=8, width=8, start=[0.0, 0.5], end=[1.0, 0.5])
    with pytest.raises(ValueError, match="the control image has 1 channels but the ControlNet reads 3 .* give an RGB"):
        controlnet_transform(tiny_sd, nets[0], _image(0)[..., :1], height=8, width=8)
    with pytest.raises(ValueError, match="uint8 array: give floats in"):
        prepare_control_image(np.zeros((8, 8, 3), np.uint8), 8, 8)
    with pytest.raises(ValueError, match=r"control images are in \[0, 1\].* rescale it"):
        prepare_control_image(np.full((8, 8, 3), -1.0, np.float32), 8, 8)
    # a ControlNet made for another base model (wider encoder)
    cfg = ControlNetConfig(in_channels=4, block_out_channels=(16,), layers_per_block=1, norm_num_groups=4,
                           cross_attention_dim=8, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",),
                           conditioning_embedding_out_channels=(4, 8))
    other = nnx.eval_shape(lambda: ControlNetModel(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"ControlNet 0 has block_out_channels=\(16,\) but the base model needs "
                                         r"\(8,\); use a ControlNet trained for this base model"):
        controlnet_transform(tiny_sd, other, _image(0), height=8, width=8)
    # a control image of the wrong size handed to the transform directly (not prepared)
    wrong = controlnet(nets[0], np.zeros((1, 6, 6, 3), np.float32))
    with pytest.raises(ValueError, match="controlnet_cond must be NHWC of size .* resize the control image"):
        tiny_sd(PROMPTS, network_transform=wrong, **KW)
    # guess mode needs to know which rows are conditional
    guess = controlnet(nets[0], _image(0)[None], guess_mode=True, steps=4)
    net = guess(lambda x, t, cond: x)
    with pytest.raises(ValueError, match='needs cond\\["conditional"\\]'):
        net(np.zeros((2, 4, 4, 4), np.float32), np.zeros((2,), np.float32), {"context": np.zeros((2, 8, 8))})
    # outside a recipe the interval needs the step count
    bare = controlnet(nets[0], _image(0)[None])(lambda x, t, cond: x)
    with pytest.raises(ValueError, match="needs the step count: run the network inside jaxdiff.s sampling loop"):
        bare(np.zeros((1, 4, 4, 4), np.float32), np.zeros((1,), np.float32), {"context": np.zeros((1, 8, 8))})


def test_prepare_control_image_resizes_as_diffusers():
    """Nearest-neighbour for arrays (torch's interpolate), Lanczos for PIL images, then [0, 1]."""
    from PIL import Image

    arr = np.arange(4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3) / 48.0
    up = prepare_control_image(arr, 8, 8)
    assert up.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(up[0], np.repeat(np.repeat(arr, 2, 0), 2, 1))
    down = prepare_control_image(np.repeat(np.repeat(arr, 3, 0), 3, 1), 4, 4)
    np.testing.assert_array_equal(down[0], arr)
    pil = Image.fromarray((np.random.default_rng(0).uniform(0, 255, (10, 12, 3))).astype(np.uint8))
    want = np.asarray(pil.resize((8, 6), resample=Image.Resampling.LANCZOS), np.float32) / 255.0
    np.testing.assert_array_equal(prepare_control_image(pil, 6, 8)[0], want)
