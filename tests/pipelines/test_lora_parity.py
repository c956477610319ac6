"""LoRA in the SD recipe against diffusers 0.42 + peft on a tiny random folder: two adapters in two formats
(diffusers' training-script files with metadata; kohya, renamed here), U-Net and text encoder, with
``set_adapters`` weights including a negative one, ``fuse_lora``; files jaxdiff saves, read by diffusers'
``load_lora_weights``; run-time scales (0: off) and per-image scales without recompiling; clear errors."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import lora
from jaxdiff.convert.lora_export import lora_tensors, save_lora
from jaxdiff.models import patches
from jaxdiff.pipelines import StableDiffusion
from jaxdiff.pipelines import stable_diffusion as S

PROMPTS = ["a photo of a cat", "a red car on a hill"]
NEGATIVE = ["blurry", ""]
SEEDS = [3, 11]
WEIGHTS = [0.8, -0.5]
TOL = 1e-3
# the settings of test_sd_parity's DDIM case on a folder of the same shapes: the fused (plain) program is shared
KW = dict(negative=NEGATIVE, steps=4, sampler="ddim", guidance=7.5, seed=SEEDS, height=16, width=16)
# adapter -> {network: (rank, alpha, target module suffixes, {suffix: (rank, alpha)} exceptions)}
ADAPTERS = {
    "a": {"unet": (2, 3.0, ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"), {"conv1": (3, 3.0),
                                                                                      "proj_in": (2, 5.0)}),
          "text_encoder": (2, 4.0, ("q_proj", "v_proj", "fc1"), {})},
    "b": {"unet": (3, 1.5, ("to_k", "to_v", "ff.net.2", "conv2"), {}),
          "text_encoder": (2, 1.0, ("k_proj", "out_proj", "fc2"), {})},
}


def _nchw(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def _pipe(root):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(root))
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = diffusers.DDIMScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _factors(pipe, name, seed):
    """{network: {module: (down, up, alpha)}}: random LoRA factors (PyTorch layouts) for the adapter's targets."""
    import torch

    rng = np.random.default_rng(seed)
    out = {}
    for net, (rank, alpha, targets, special) in ADAPTERS[name].items():
        out[net] = {}
        for module, layer in getattr(pipe, net).named_modules():
            hit = next((t for t in targets if module.endswith("." + t)), None)
            if hit is None or not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            r, a = special.get(hit, (rank, alpha))
            w = layer.weight
            down = rng.standard_normal((r, *w.shape[1:])) * 0.3
            up = rng.standard_normal((w.shape[0], r) + (1, 1) * (w.ndim == 4)) * 0.2
            out[net][module] = (down.astype(np.float32), up.astype(np.float32), a)
    return out


def _diffusers_file(pipe, folder, seed):
    """Adapter "a" as diffusers saves it (save_lora_weights): PEFT names and each network's LoraConfig as
    metadata, whose alphas matter (alpha != r, an alpha_pattern and a rank_pattern)."""
    import diffusers
    import torch

    layers, meta = {}, {}
    for net, modules in _factors(pipe, "a", seed).items():
        rank, alpha, targets, special = ADAPTERS["a"][net]
        layers[net] = {}
        for module, (down, up, _) in modules.items():
            layers[net][f"{module}.lora_A.weight"] = torch.from_numpy(down)
            layers[net][f"{module}.lora_B.weight"] = torch.from_numpy(up)
        meta[net] = dict(r=rank, lora_alpha=alpha, target_modules=list(targets),
                         rank_pattern={k: v[0] for k, v in special.items()},
                         alpha_pattern={k: v[1] for k, v in special.items()})
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=meta["unet"], text_encoder_lora_adapter_metadata=meta["text_encoder"])
    return folder / "pytorch_lora_weights.safetensors"


def _kohya_file(pipe, path, seed):
    """Adapter "b" in kohya's layout: lora_unet_ / lora_te_text_model_ + underscored module, lora_down / lora_up,
    alpha (transformers 5 names CLIP's modules without text_model., kohya files have it)."""
    from safetensors.numpy import save_file

    tensors = {}
    for net, modules in _factors(pipe, "b", seed).items():
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}[net]
        for module, (down, up, alpha) in modules.items():
            if net == "text_encoder" and module.startswith("text_model."):
                module = module[len("text_model."):]
            kohya = prefix + module.replace(".", "_")
            tensors[f"{kohya}.lora_down.weight"], tensors[f"{kohya}.lora_up.weight"] = down, up
            tensors[f"{kohya}.alpha"] = np.asarray(alpha, np.float32)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import _sd_folders as folders
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tiny torch models run several times faster on one thread on a busy machine
    tmp = tmp_path_factory.mktemp("lora")
    built = folders.build_pipeline(seed=5)
    root = folders.save(built, tmp / "sd")
    files = {"a": _diffusers_file(built, tmp / "a", 1), "b": _kohya_file(built, tmp / "b.safetensors", 2)}
    sd = StableDiffusion.from_pretrained(root)
    noise = _nchw(sd.initial_noise(SEEDS, 2, 16, 16))
    ref = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=16,
               width=16, latents=noise, output_type="np")
    import diffusers

    pipe = built  # the folder's own pipeline, with the DDIM scheduler jaxdiff's "ddim" reproduces
    pipe.scheduler = diffusers.DDIMScheduler.from_config(json.loads((root / "scheduler" / "scheduler_config.json")
                                                                    .read_text()))
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(**ref).images
    for name, f in files.items():
        pipe.load_lora_weights(str(f), adapter_name=name)
    pipe.set_adapters(["a", "b"], adapter_weights=WEIGHTS)
    with_lora = pipe(**ref).images
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=["a", "b"])
    pipe.unload_lora_weights()
    fused = pipe(**ref).images
    adapters = [lora.load_lora(files[n], sd) for n in ("a", "b")]
    yield dict(root=root, sd=sd, ref=ref, plain=plain, with_lora=with_lora, fused=fused, adapters=adapters, tmp=tmp)
    torch.set_num_threads(threads)


@pytest.mark.parity
def test_two_adapters_with_weights_equal_diffusers_set_adapters(case):
    """A diffusers file (PEFT names, metadata) and a kohya file, U-Net and text encoder, weights 0.8 and -0.5:
    diffusers' images; per-prompt scales (prompt 1 with both adapters off) reuse the program and give prompt i
    diffusers' image at its scales."""
    sd, adapters = case["sd"], case["adapters"]
    a, b = adapters
    assert a.unet is not None and a.text_encoder is not None and b.unet is not None and b.text_encoder is not None
    assert any(v.down.ndim == 4 for v in a.unet.low_rank.values())  # LoRA-conv (resnet conv1)
    assert np.abs(case["with_lora"] - case["plain"]).max() > 0.02  # the adapters visibly change the image
    both = [np.full(2, w, np.float32) for w in WEIGHTS]  # one scale per prompt, the same for both
    sd_l, net = lora.apply(sd, adapters, both)
    np.testing.assert_allclose(sd_l(PROMPTS, network_transform=net, **KW), case["with_lora"], atol=TOL, rtol=0)

    size = S.generate_jit._cache_size()
    mixed = [np.array([w, 0.0], np.float32) for w in WEIGHTS]  # prompt 0 with the adapters, prompt 1 without
    sd_m, net_m = lora.apply(sd, adapters, mixed)
    out = sd_m(PROMPTS, network_transform=net_m, **KW)
    assert S.generate_jit._cache_size() == size  # new scales, adapters off: the same program
    np.testing.assert_allclose(out[0], case["with_lora"][0], atol=TOL, rtol=0)
    np.testing.assert_allclose(out[1], case["plain"][1], atol=TOL, rtol=0)


@pytest.mark.parity
def test_fuse_equals_diffusers_fuse_lora_and_unfuse_is_exact(case):
    sd, adapters = case["sd"], case["adapters"]
    fused_sd, undo = lora.fuse(sd, adapters, WEIGHTS)
    np.testing.assert_allclose(fused_sd(PROMPTS, **KW), case["fused"], atol=TOL, rtol=0)
    back = lora.unfuse(fused_sd, undo)
    for net in ("unet", "text_encoder"):
        before, after = getattr(sd.models, net).state, getattr(back.models, net).state
        changed = getattr(fused_sd.models, net).state
        assert jax.tree_util.tree_structure(before) == jax.tree_util.tree_structure(after)
        for x, y, z in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after),
                           jax.tree_util.tree_leaves(changed)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-exact
        assert sum(not np.array_equal(np.asarray(x), np.asarray(z)) for x, z in
                   zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(changed))) >= 5


@pytest.mark.parity
def test_files_jaxdiff_saves_load_in_diffusers_to_the_same_images(case):
    """Adapter a saved in diffusers' format (PEFT names + metadata) and b in kohya's: diffusers' load_lora_weights
    with the same weights gives the images above; jaxdiff reads both back to the same patches. (b goes to kohya:
    diffusers 0.42 reads kohya text-encoder q_proj / v_proj LoRA only when the file also patches out_proj.)"""
    sd, (a, b) = case["sd"], case["adapters"]
    paths = {"a": save_lora(case["tmp"] / "a_saved", a, "diffusers", metadata={"note": "jaxdiff"}),
             "b": save_lora(case["tmp"] / "b_kohya.safetensors", b, "kohya")}
    tensors, meta = lora_tensors(b, "kohya")
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors) and meta["ss_network_module"]
    for name, adapter in (("a", a), ("b", b)):
        again = lora.load_lora(paths[name], sd)
        for net in ("unet", "text_encoder"):
            want, got = getattr(adapter, net).deltas(), getattr(again, net).deltas()
            assert sorted(want) == sorted(got)
            for k in want:
                np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-7)
    pipe = _pipe(case["root"])
    for name, path in paths.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(["a", "b"], adapter_weights=WEIGHTS)
    np.testing.assert_allclose(pipe(**case["ref"]).images, case["with_lora"], atol=TOL, rtol=0)


# ---- bad input (the tiny JAX-only model) --------------------------------------------------------------------

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def _pair(r, din, dout, rng):
    return rng.standard_normal((r, din)).astype(np.float32), rng.standard_normal((dout, r)).astype(np.float32)


def test_every_bad_key_of_either_network_is_listed_in_one_error(tiny_sd):
    rng = np.random.default_rng(0)
    d, u = _pair(2, 8, 8, rng)
    tensors = {
        f"unet.{Q}.lora_A.weight": d, f"unet.{Q}.lora_B.weight": u,  # fine
        f"unet.{K}.lora_A.weight": np.ones((2, 7), np.float32),  # wrong width
        f"unet.{K}.lora_B.weight": np.ones((8, 2), np.float32),
        "unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": d,  # no such layer
        "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": u,
        f"unet.{Q}.lora_magnitude_vector": np.ones(8, np.float32),  # DoRA
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": d,  # fine (kohya)
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": u,
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": d,  # half a pair
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": d,  # SDXL's second encoder
    }
    with pytest.raises(patches.PatchMismatchError) as err:
        lora.load_lora(tensors, tiny_sd)
    msg = str(err.value)
    for what in ("lora_te2_", "attn2.to_k.weight: patch (7, 8), model (8, 8)", "down_blocks.7.attentions.0.proj_in: no "
                 "such layer", "lora_magnitude_vector: DoRA", "mlp_fc1: has only the down matrix"):
        assert what in msg, (what, msg)
    assert "5 problem(s)" in msg and "self_attn_q_proj:" not in msg and f"{Q}:" not in msg
    with pytest.raises(patches.PatchMismatchError, match="no such layer"):  # a LoRA for another model altogether
        lora.load_lora({"unet.foo.bar.lora_A.weight": d, "unet.foo.bar.lora_B.weight": u}, tiny_sd)
    with pytest.raises(ValueError, match="2 adapters but 1 scales"):
        good = lora.load_lora({k: v for k, v in tensors.items() if Q in k and "magnitude" not in k}, tiny_sd)
        lora.apply(tiny_sd, [good, good], [1.0])


def test_legacy_names_unprefixed_files_and_lycoris_load_onto_the_same_layers(tiny_sd):
    """Older diffusers names (processor.to_q_lora, lora_linear_layer), an unprefixed U-Net file
    (``save_attn_procs``) and a kohya-named LoHa all find their layers."""
    rng = np.random.default_rng(1)
    d, u = _pair(2, 8, 8, rng)
    te = "text_model.encoder.layers.0"
    new = {f"unet.{Q}.lora_A.weight": d, f"unet.{Q}.lora_B.weight": u,
           f"text_encoder.{te}.self_attn.k_proj.lora_A.weight": d,
           f"text_encoder.{te}.self_attn.k_proj.lora_B.weight": u,
           f"text_encoder.{te}.mlp.fc2.lora_A.weight": _pair(2, 16, 8, rng)[0],
           f"text_encoder.{te}.mlp.fc2.lora_B.weight": u}
    q_old = Q.replace("attn1.to_q", "attn1.processor.to_q_lora")
    old = {f"unet.{q_old}.down.weight": d, f"unet.{q_old}.up.weight": u,
           f"text_encoder.{te}.self_attn.to_k_lora.down.weight": d,
           f"text_encoder.{te}.self_attn.to_k_lora.up.weight": u,
           f"text_encoder.{te}.mlp.fc2.lora_linear_layer.down.weight": new[f"text_encoder.{te}.mlp.fc2.lora_A.weight"],
           f"text_encoder.{te}.mlp.fc2.lora_linear_layer.up.weight": u}
    a, b = lora.load_lora(new, tiny_sd), lora.load_lora(old, tiny_sd)
    bare = lora.load_lora({k[len("unet."):]: v for k, v in new.items() if k.startswith("unet.")}, tiny_sd)
    for x in (b, bare):
        for net in ("unet", "text_encoder") if x is b else ("unet",):
            want, got = getattr(a, net).deltas(), getattr(x, net).deltas()
            assert sorted(want) == sorted(got)
            for k in want:
                np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    assert bare.text_encoder is None
    loha = {f"lora_unet_{Q.replace('.', '_')}.{n}": rng.standard_normal(s).astype(np.float32)
            for n, s in (("hada_w1_a", (8, 2)), ("hada_w1_b", (2, 8)), ("hada_w2_a", (8, 2)), ("hada_w2_b", (2, 8)))}
    h = lora.load_lora(loha, tiny_sd)
    assert list(h.unet.full) == [Q + ".kernel"] and h.text_encoder is None
    k = f"lora_te_{te.replace('.', '_')}_self_attn_k_proj"  # SDXL-style lora_te1_ is the (only) text encoder
    te1 = {f"{k}.lora_down.weight": d, f"{k}.lora_up.weight": u}
    one, first = lora.load_lora(te1, tiny_sd), lora.load_lora({"lora_te1_" + n[8:]: v for n, v in te1.items()}, tiny_sd)
    assert sorted(one.text_encoder.names()) == sorted(first.text_encoder.names()) == [
        te + ".self_attn.k_proj.kernel"]


def test_text_encoder_patch_at_one_scale_and_per_prompt(tiny_sd):
    """The recipe's text encoder after apply: at a number it encodes as the merged weights do; with one scale per
    prompt, row i encodes as the whole batch at scale i (0: the base encoder)."""
    rng = np.random.default_rng(2)
    te = "text_encoder.text_model.encoder.layers.0"
    tensors = {f"{te}.self_attn.q_proj.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
               f"{te}.self_attn.q_proj.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
               f"{te}.mlp.fc1.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
               f"{te}.mlp.fc1.lora_B.weight": rng.standard_normal((16, 2)).astype(np.float32)}
    adapter = lora.load_lora(tensors, tiny_sd)
    ids = jnp.asarray(tiny_sd.tokenize(["a b", "c d e"]))
    encode = jax.jit(lambda m, ids: m.encode_text(ids))
    base = np.asarray(encode(tiny_sd.models, ids))
    merged = dataclasses.replace(tiny_sd.models, text_encoder=patches.merge(tiny_sd.models.text_encoder,
                                                                            adapter.text_encoder, 0.7))
    at = {s: np.asarray(encode(lora.apply(tiny_sd, [adapter], s)[0].models, ids)) for s in (0.0, 0.7)}
    np.testing.assert_allclose(at[0.7], np.asarray(encode(merged, ids)), atol=1e-5)
    np.testing.assert_array_equal(at[0.0], base)
    assert np.abs(at[0.7] - base).max() > 1e-2
    per = np.asarray(encode(lora.apply(tiny_sd, [adapter], [np.array([0.7, 0.0])])[0].models, ids))
    np.testing.assert_allclose(per[0], at[0.7][0], atol=1e-5)
    np.testing.assert_allclose(per[1], base[1], atol=1e-6)
