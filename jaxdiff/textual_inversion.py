"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): new words as learned token embeddings.

A textual-inversion embedding is ``n`` vectors of the text encoder's token width, ``v*`` of Gal et al.
Eq. 2, learned with every network frozen. Files people share, read here without running code:

- diffusers' ``learned_embeds.safetensors`` / ``.bin``: one entry ``{token: (D,) or (n, D)}``;
- AUTOMATIC1111 ``.pt`` / ``.bin`` (through :func:`jaxdiff.convert.pt_reader.read_pt`): ``string_to_param``
  ``{"*": (n, D)}``, ``string_to_token``, ``name``, ``step``...;
- AUTOMATIC1111 ``.safetensors``: ``emb_params`` (n, D);
- AUTOMATIC1111 PNG images: the ``.pt`` dict as JSON (tensors as ``{"TORCHTENSOR": nested lists}``),
  base64-encoded in the ``sd-ti-embedding`` text chunk.

SDXL embeddings (``clip_l`` and ``clip_g``) are recognised and refused for SD 1.x / 2.x models. The token
(the word that triggers the embedding in a prompt) is ``token=`` if given, else diffusers' key, the PNG's
``name``, or the file's stem for A1111 ``.pt`` / ``.safetensors`` files (AUTOMATIC1111 triggers an embedding
by its file name; diffusers reads a ``.pt``'s ``name`` field instead: pass ``token=`` to choose).

Loading (:func:`load_textual_inversion`) does what diffusers' ``load_textual_inversion`` does: an ``n``-vector
embedding adds tokens ``token, token_1, ..., token_{n-1}`` to the tokenizer (``add_tokens``) and a prompt's
``token`` is expanded to all of them (diffusers' ``maybe_convert_prompt``, done here by
:class:`EmbeddingTokenizer`). The rows go into the text encoder's token table padded once to a capacity
(:func:`jaxdiff.models.patches.pad_embedding`), so later tokens change values only, never shapes: the compiled
program is reused. :func:`train_embedding` learns a new token with optax, everything else frozen.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import patches
from jaxdiff.models._pure import PureModel

Array = jax.Array
TABLE = "text_model.embeddings.token_embedding.weight"
"""The text encoder's token-embedding table (transformers' ``CLIPTextModel`` name)."""
PNG_CHUNK = "sd-ti-embedding"
SPARE_ROWS = 64
"""Rows padded beyond the highest token id when the table first grows (tokens added later reuse them)."""


class EmbeddingFormatError(ValueError):
    """A file that is not a textual-inversion embedding jaxdiff understands, or one for another model."""


@dataclasses.dataclass(frozen=True)
class Embedding:
    """A textual-inversion embedding: its ``token`` and ``vectors`` (n, D) float32."""

    token: str
    vectors: np.ndarray
    source: str = ""

    @property
    def tokens(self) -> list[str]:
        """The tokenizer tokens of the ``n`` vectors: ``token, token_1, ..., token_{n-1}`` (diffusers' names)."""
        return token_names(self.token, len(self.vectors))


def token_names(token: str, n: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, n)]


# ---- reading files ----------------------------------------------------------------------------------------


def _decode_json_tensors(obj: Any) -> Any:
    if isinstance(obj, dict) and set(obj) == {"TORCHTENSOR"}:
        return np.asarray(obj["TORCHTENSOR"], np.float32)
    return obj


def read_png_embedding(path: str | os.PathLike) -> dict:
    """The embedding dict an AUTOMATIC1111 PNG carries in its ``sd-ti-embedding`` text chunk."""
    from PIL import Image

    with Image.open(path) as im:
        text = getattr(im, "text", None) or im.info
        blob = text.get(PNG_CHUNK)
    if blob is None:
        raise EmbeddingFormatError(f"{path}: no '{PNG_CHUNK}' text chunk, so the image carries no embedding "
                                   "(jaxdiff reads the text-chunk form; re-save the embedding as .pt or .safetensors)")
    try:
        return json.loads(base64.b64decode(blob), object_hook=_decode_json_tensors)
    except (ValueError, TypeError) as e:
        raise EmbeddingFormatError(f"{path}: the '{PNG_CHUNK}' chunk is not base64 JSON ({e})") from None


def _read_file(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from jaxdiff.convert.safetensors_io import SafetensorsFile

        with SafetensorsFile(path) as f:
            return {k: np.array(f[k]) for k in f}
    if suffix == ".png":
        return read_png_embedding(path)
    if suffix in (".pt", ".bin", ".pth", ".ckpt"):
        from jaxdiff.convert.pt_reader import read_pt

        data = read_pt(path)
        if isinstance(data, np.ndarray):  # a bare tensor: token= names it
            return {"": data}
        if not isinstance(data, dict):
            raise EmbeddingFormatError(f"{path} holds a {type(data).__name__}, not an embedding dict")
        return data
    raise EmbeddingFormatError(f"{path}: unknown embedding file type {suffix!r}; expected .safetensors, .pt, "
                               ".bin or .png")


def _as_vectors(value: Any, path: Path, what: str) -> np.ndarray:
    vec = np.asarray(value)
    if vec.dtype.kind not in "fc" and vec.dtype.name != "bfloat16":
        raise EmbeddingFormatError(f"{path}: {what} is not a float tensor ({vec.dtype})")
    vec = vec.astype(np.float32)
    if vec.ndim == 1:
        vec = vec[None]
    if vec.ndim != 2 or vec.shape[0] == 0:
        raise EmbeddingFormatError(f"{path}: {what} has shape {vec.shape}; an embedding is (D,) or (n, D)")
    return vec


def embedding_from_dict(data: Mapping[str, Any], path: str | os.PathLike = "<dict>", token: str | None = None
                        ) -> Embedding:
    """Recognise an embedding dict in any of the formats of the module docstring."""
    path = Path(path)
    keys = sorted(map(str, data))
    if "clip_l" in data or "clip_g" in data:
        raise EmbeddingFormatError(f"{path} is an SDXL embedding (clip_l / clip_g vectors for SDXL's two text "
                                   "encoders); this Stable Diffusion 1.x / 2.x model has one text encoder: use an "
                                   "embedding trained for SD 1.x / 2.x")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingFormatError(f"{path}: string_to_param must hold one entry ('*'), got "
                                       f"{type(params).__name__} {sorted(params) if isinstance(params, dict) else ''}")
        vec = _as_vectors(next(iter(params.values())), path, "string_to_param['*']")
        name = token or (data.get("name") if path.suffix.lower() == ".png" else None) or path.stem
        return Embedding(str(name), vec, "a1111")
    if "emb_params" in data:
        return Embedding(token or path.stem, _as_vectors(data["emb_params"], path, "emb_params"), "a1111")
    if len(data) == 1:
        key, value = next(iter(data.items()))
        return Embedding(token or str(key) or path.stem, _as_vectors(value, path, f"entry {key!r}"), "diffusers")
    raise EmbeddingFormatError(f"{path} is not a textual-inversion embedding: expected one {{token: tensor}} entry "
                               f"(diffusers), string_to_param or emb_params (AUTOMATIC1111); found keys {keys[:10]}")


def read_embedding(path: str | os.PathLike, token: str | None = None) -> Embedding:
    """An :class:`Embedding` from any file format of the module docstring; ``token`` overrides its name."""
    path = Path(path)
    if path.is_dir():
        for name in ("learned_embeds.safetensors", "learned_embeds.bin"):
            if (path / name).is_file():
                return read_embedding(path / name, token)
        raise FileNotFoundError(f"{path} has no learned_embeds.safetensors (or .bin)")
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {path} does not exist")
    return embedding_from_dict(_read_file(path), path, token)


def save_embedding(path: str | os.PathLike, embedding: Embedding, *, style: str = "diffusers") -> Path:
    """Write ``embedding`` as safetensors: ``style="diffusers"`` ``{token: (n, D)}`` (diffusers'
    ``learned_embeds.safetensors``, which ``load_textual_inversion`` reads), ``"a1111"`` ``{"emb_params": (n, D)}``
    (AUTOMATIC1111 triggers it by the file name)."""
    from jaxdiff.convert.export import write_safetensors

    vectors = np.asarray(embedding.vectors, np.float32)
    if style == "diffusers":
        tensors = {embedding.token: vectors}
    elif style == "a1111":
        tensors = {"emb_params": vectors}
    else:
        raise ValueError(f"style must be 'diffusers' or 'a1111', got {style!r}")
    return write_safetensors(path, tensors, {"format": "pt", "token": embedding.token})


# ---- the tokenizer ------------------------------------------------------------------------------------------


class EmbeddingTokenizer:
    """A tokenizer whose prompts have each multi-vector token ``t`` expanded to ``t t_1 ... t_{n-1}`` first
    (diffusers' ``maybe_convert_prompt``); everything else is the wrapped tokenizer's."""

    def __init__(self, inner: Any, multi: Mapping[str, Sequence[str]] | None = None):
        self.inner = inner
        self.multi = {k: tuple(v) for k, v in (multi or {}).items()}

    def expand(self, prompt: str) -> str:
        if not self.multi:
            return prompt
        present = set(self.inner.tokenize(prompt))
        for token, names in self.multi.items():
            if token in present:
                prompt = prompt.replace(token, " ".join(names))
        return prompt

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        text = self.expand(text) if isinstance(text, str) else [self.expand(t) for t in text]
        return self.inner(text, *args, **kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def _split_tokenizer(tokenizer: Any) -> tuple[Any, dict[str, tuple[str, ...]]]:
    if isinstance(tokenizer, EmbeddingTokenizer):
        return tokenizer.inner, dict(tokenizer.multi)
    return tokenizer, {}


# ---- the text encoder's table -----------------------------------------------------------------------------


def table_shape(text_encoder: PureModel) -> tuple[int, int]:
    """(rows, width) of the text encoder's token table."""
    name = patches._resolve(text_encoder.state, TABLE)
    return tuple(patches._params(text_encoder.state)[name].shape)  # type: ignore[return-value]


def _capacity(need: int) -> int:
    return -(-(need + SPARE_ROWS) // SPARE_ROWS) * SPARE_ROWS


def reserve_tokens(sd: Any, n: int = SPARE_ROWS) -> Any:
    """``sd`` with its token table padded for ``n`` more tokens now, so that loading or training embeddings later
    (up to that many vectors) changes no shape and recompiles nothing."""
    rows, _ = table_shape(sd.models.text_encoder)
    need = len(sd.tokenizer) + n
    if rows >= need:
        return sd
    te = patches.pad_embedding(sd.models.text_encoder, TABLE, need)
    return dataclasses.replace(sd, models=dataclasses.replace(sd.models, text_encoder=te))


def add_embeddings(sd: Any, embeddings: Sequence[Embedding], *, capacity: int | None = None) -> Any:
    """A new ``StableDiffusion`` whose tokenizer knows ``embeddings``' tokens and whose text encoder embeds them
    (``sd`` itself is unchanged). Errors: a width other than the text encoder's, a token already in the
    vocabulary. The table is padded (once) to ``capacity`` rows, default the highest new id plus
    :data:`SPARE_ROWS`, rounded up to a multiple of it."""
    inner, multi = _split_tokenizer(sd.tokenizer)
    rows, width = table_shape(sd.models.text_encoder)
    vocab = inner.get_vocab()
    seen: set[str] = set()
    for emb in embeddings:
        if emb.vectors.shape[-1] != width:
            raise EmbeddingFormatError(
                f"embedding {emb.token!r} has vectors of width {emb.vectors.shape[-1]}, but this text encoder's "
                f"tokens are {width} wide: it was trained for another model (SD 1.x: 768, SD 2.x: 1024)")
        for name in emb.tokens:
            if name in vocab or name in seen:
                raise ValueError(f"token {name!r} is already in the tokenizer's vocabulary; load the embedding under "
                                 "another name (token=...)")
            seen.add(name)
    inner = copy.deepcopy(inner)
    te = sd.models.text_encoder
    placed: list[tuple[list[int], np.ndarray]] = []
    for emb in embeddings:
        inner.add_tokens(emb.tokens)
        ids = [int(inner.convert_tokens_to_ids(t)) for t in emb.tokens]
        placed.append((ids, emb.vectors))
        if len(emb.tokens) > 1:
            multi[emb.token] = tuple(emb.tokens)
    need = max((max(ids) + 1 for ids, _ in placed), default=0)
    if need > rows:
        target = capacity if capacity is not None else _capacity(need)
        if target < need:
            raise ValueError(f"capacity {target} is too small for token ids up to {need - 1}")
        te = patches.pad_embedding(te, TABLE, target)
    for ids, vectors in placed:
        for i, v in zip(ids, vectors):
            te = patches.set_embedding_rows(te, TABLE, v[None], i)
    tokenizer = EmbeddingTokenizer(inner, multi) if multi else inner
    return dataclasses.replace(sd, tokenizer=tokenizer, models=dataclasses.replace(sd.models, text_encoder=te))


def load_textual_inversion(sd: Any, path: str | os.PathLike | Sequence[str | os.PathLike],
                           token: str | Sequence[str | None] | None = None, *, capacity: int | None = None) -> Any:
    """``sd`` with the embedding(s) at ``path`` loaded (a new ``StableDiffusion``; ``sd`` is unchanged).

    ``path``: a file in any format of the module docstring (or a folder with ``learned_embeds.safetensors``),
    or a list of them; ``token`` overrides the trigger word (one per path). As diffusers'
    ``pipe.load_textual_inversion(path, token=token)``: same tokens, ids and text embeddings."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(paths)
    if len(tokens) != len(paths):
        raise ValueError(f"got {len(paths)} embedding files and {len(tokens)} tokens; give one token per file")
    return add_embeddings(sd, [read_embedding(p, t) for p, t in zip(paths, tokens)], capacity=capacity)


def token_ids(sd: Any, token: str) -> list[int]:
    """The ids of ``token``'s vectors (``token, token_1, ...``) in ``sd``'s tokenizer."""
    inner, multi = _split_tokenizer(sd.tokenizer)
    if token not in inner.get_vocab():
        raise KeyError(f"token {token!r} is not loaded (load_textual_inversion or add_embeddings first)")
    return [int(inner.convert_tokens_to_ids(t)) for t in multi.get(token, (token,))]


def get_embedding(sd: Any, token: str) -> Embedding:
    """The loaded (or trained) embedding of ``token`` read back from the text encoder's table."""
    ids = token_ids(sd, token)
    name = patches._resolve(sd.models.text_encoder.state, TABLE)
    table = np.asarray(patches._params(sd.models.text_encoder.state)[name])
    return Embedding(token, table[ids].astype(np.float32), "jaxdiff")


# ---- training (Gal et al. 2022, Eq. 2) ----------------------------------------------------------------------


@jax.jit
def _posterior_mean_latents(models: Any, images: Array) -> Array:
    return models.to_latent(models.encode_image(images * 2.0 - 1.0)[0])


def encode_images(sd: Any, images: Any, batch: int = 64) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1] -> scaled latents (the VAE posterior means, as training uses); one compiled
    encoder per batch shape, reused across calls."""
    images = np.asarray(images, np.float32)
    return np.concatenate([np.asarray(_posterior_mean_latents(sd.models, images[i: i + batch]))
                           for i in range(0, len(images), batch)])


@jax.jit
def _decoded_images(models: Any, latents: Array) -> Array:
    return models.decode(latents)


def decode_latents(sd: Any, latents: Any, batch: int = 64) -> np.ndarray:
    """Scaled latents -> images (N, H, W, 3) in [0, 1] through the pipeline's VAE decoder (the inverse of
    :func:`encode_images`); one compiled decoder per batch shape, reused across calls."""
    latents = np.asarray(latents, np.float32)
    return np.concatenate([np.asarray(_decoded_images(sd.models, latents[i: i + batch]))
                           for i in range(0, len(latents), batch)])


def optimise(loss: Callable[[Any, Any, dict, Array], Array], params: Any, frozen: Any,
             data: Mapping[str, np.ndarray], *, steps: int, learning_rate: float, batch_size: int,
             seed: int = 0) -> tuple[Any, np.ndarray]:
    """Adam (optax) on ``params`` only: ``steps`` jit-compiled steps of ``loss(params, frozen, batch, key)`` on
    random minibatches of ``data`` (arrays with a common first axis); ``frozen`` (the base model) is an
    argument, never differentiated or updated. Returns the parameters and the loss of each step."""
    import optax

    tx = optax.adam(learning_rate)
    n = len(next(iter(data.values())))
    if any(len(v) != n for v in data.values()):
        raise ValueError("every data array needs the same number of examples")

    @jax.jit
    def step(p: Any, opt: Any, frozen: Any, batch: dict, key: Array) -> tuple[Any, Any, Array]:
        value, grads = jax.value_and_grad(loss)(p, frozen, batch, key)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, value

    opt = tx.init(params)
    rng, key = np.random.default_rng(seed), jax.random.key(seed)
    history = []
    for i in range(steps):
        idx = rng.choice(n, size=min(batch_size, n), replace=False)
        params, opt, value = step(params, opt, frozen, {k: jnp.asarray(v[idx]) for k, v in data.items()},
                                  jax.random.fold_in(key, i))
        history.append(float(value))
    return params, np.asarray(history, np.float32)


def denoising_loss(sd: Any) -> Any:
    """The training loss used here: DDPM's epsilon loss on the model's own schedule (Ho et al. 2020, Eq. 14)."""
    from jaxdiff.losses import ddpm_loss

    return ddpm_loss(sd.models.alphas_cumprod)


def train_embedding(sd: Any, token: str, images: Any, prompts: Sequence[str], *, num_vectors: int = 1,
                    init_word: str | None = None, steps: int = 300, learning_rate: float = 5e-3,
                    batch_size: int = 8, seed: int = 0, latents: Any = None) -> tuple[Any, Embedding, np.ndarray]:
    """Learn ``token`` (``num_vectors`` vectors) from ``images`` (N, H, W, 3) in [0, 1] captioned by ``prompts``
    (each naming ``token``), with the denoising loss of the frozen model (Gal et al. 2022, Eq. 2; DDPM
    epsilon loss, Ho et al. 2020 Eq. 14). Only the token's rows are trained: the U-Net, VAE and every other
    row of the text encoder stay bit-identical. The start is ``init_word``'s embedding (Gal et al.: a coarse
    descriptor), else the mean row. ``latents``: precomputed scaled latents (skips encoding ``images``).

    Returns ``(sd with the token, the Embedding, loss per step)``; save with :func:`save_embedding`."""
    if len(prompts) != len(images if latents is None else latents):
        raise ValueError("give one prompt per training image")
    name = patches._resolve(sd.models.text_encoder.state, TABLE)
    table = np.asarray(patches._params(sd.models.text_encoder.state)[name], np.float32)
    if init_word is not None:
        inner, _ = _split_tokenizer(sd.tokenizer)
        word_ids = inner(init_word, add_special_tokens=False)["input_ids"]
        if len(word_ids) != 1:
            raise ValueError(f"init_word {init_word!r} is {len(word_ids)} tokens; use a word that is one token")
        start = np.repeat(table[word_ids], num_vectors, axis=0)
    else:
        start = np.repeat(table[: len(sd.tokenizer)].mean(0, keepdims=True), num_vectors, axis=0)
    trained = add_embeddings(sd, [Embedding(token, start, "init")])
    ids = token_ids(trained, token)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(f"the new token ids {ids} are not consecutive")
    x0 = np.asarray(encode_images(sd, images) if latents is None else latents, np.float32)
    data = {"x": x0, "ids": trained.tokenize(list(prompts))}

    def objective(vectors: Array, frozen: tuple, batch: dict, key: Array) -> Array:
        models, loss = frozen
        te = patches.set_embedding_rows(models.text_encoder, TABLE, vectors, ids[0])
        m = dataclasses.replace(models, text_encoder=te)
        return loss(m.denoiser(), batch["x"], key, {"context": m.encode_text(batch["ids"])}).mean()

    vectors, history = optimise(objective, jnp.asarray(start), (trained.models, denoising_loss(sd)), data,
                                steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed)
    te = patches.set_embedding_rows(trained.models.text_encoder, TABLE, vectors, ids[0])
    out = dataclasses.replace(trained, models=dataclasses.replace(trained.models, text_encoder=te))
    return out, Embedding(token, np.asarray(vectors, np.float32), "jaxdiff"), history
