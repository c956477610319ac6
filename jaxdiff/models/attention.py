"""One attention function, ``softmax(q k^T * scale) v`` (Vaswani et al. 2017), with backends.

:func:`attention` takes ``(B, T, heads, d)`` arrays (the layout of ``jax.nn.dot_product_attention``)
and dispatches to one of:

- ``"cpu"``: the dense kernel tuned for XLA:CPU. Heads-major, logits and softmax in float32, the
  softmax denominator dividing the ``(T, d)`` output; once the float32 logits exceed
  :data:`CPU_ATTENTION_BLOCK_BYTES` the queries run in blocks of :data:`CPU_ATTENTION_QUERY_CHUNK`
  under ``lax.map`` (query chunking, Rabe & Staats 2021), which keeps each block's logits in cache.
- ``"xla"`` / ``"cudnn"``: ``jax.nn.dot_product_attention`` with that ``implementation`` (cuDNN
  flash attention needs a CUDA GPU, float16/bfloat16 and a head dim that is a multiple of 8).
- ``"blockwise"``: memory-bounded attention with the online softmax (Rabe & Staats 2021, Sec. 3;
  Dao et al. 2022, FlashAttention Alg. 1): for each block of queries a scan over blocks of keys
  keeps the running maximum, the running sum and the unnormalised output, so the temporary memory
  is one ``(q_block, k_block)`` tile per head, independent of ``T_q * T_k``.
- ``"auto"`` (default): on GPU cuDNN where it applies, else XLA; elsewhere the dense kernel (``"cpu"``
  on CPU, ``"xla"`` on other platforms) while the full float32 logits fit :data:`DENSE_LOGITS_BUDGET`
  bytes, else ``"blockwise"``.

Every backend takes an additive ``bias`` and a boolean ``mask`` (both broadcast to ``(B, heads, T_q, T_k)``)
and ``is_causal``, as ``jax.nn.dot_product_attention`` does (CLIP's causal and padding masks, T5's relative
position bias); the ``"cpu"`` and ``"blockwise"`` kernels slice them per tile. Without them the kernels
trace exactly as before (no extra operation on the U-Net path).

The choice is made at trace time from static shapes, dtypes and the platform, so it is ``jit``
friendly. Override it for one call (``backend=``), one layer (the layers' ``attention_backend``)
or everywhere (:func:`set_default_backend`, or the :func:`default_backend` context manager). The
default is read when a function is traced: jax's trace cache does not see it, so set it before the
first call of a jitted function (a function already traced keeps the backend it was traced with).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array

BACKENDS = ("auto", "cpu", "xla", "cudnn", "blockwise")
# "cpu" kernel: float32 logits above this many bytes run in blocks of queries.
CPU_ATTENTION_BLOCK_BYTES = 2 ** 21
# Queries per block of the "cpu" kernel: measured best (or within noise of it) from 77 to 4096 keys on XLA:CPU.
CPU_ATTENTION_QUERY_CHUNK = 64
# "auto" leaves the "cpu" kernel for "blockwise" when the full float32 logits exceed this many bytes.
DENSE_LOGITS_BUDGET = 2 ** 28
# "blockwise" tile: queries per block and keys per scan step; as fast as the "cpu" kernel (within noise)
# at 1024-4096 queries and 77-4096 keys on XLA:CPU, where 256 queries per block was up to 2.4x slower.
BLOCKWISE_QUERY_BLOCK = 64
BLOCKWISE_KEY_BLOCK = 1024

_default = ["auto"]


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {BACKENDS}")
    return name


def set_default_backend(name: str) -> None:
    """Set the backend that layers without their own choice use (read when a function is traced)."""
    _default[0] = _check_backend(name)


def get_default_backend() -> str:
    """The backend that layers without their own choice use."""
    return _default[0]


@contextmanager
def default_backend(name: str) -> Iterator[None]:
    """``with default_backend("blockwise"): ...`` sets the default backend inside the block only."""
    previous = _default[0]
    set_default_backend(name)
    try:
        yield
    finally:
        _default[0] = previous


def _cudnn_applies(dtype, head_dim: int) -> bool:
    """cuDNN flash attention's documented domain (jax ``check_is_flash_attention``, pre-Hopper bound)."""
    return jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16) and head_dim % 8 == 0 and head_dim <= 128


def choose_backend(batch: int, heads: int, queries: int, keys: int, head_dim: int, dtype, *,
                   platform: str | None = None, budget: int = DENSE_LOGITS_BUDGET) -> str:
    """The backend ``"auto"`` resolves to for these static sizes on ``platform`` (default: jax's)."""
    platform = platform or jax.default_backend()
    if platform == "gpu":
        return "cudnn" if _cudnn_applies(dtype, head_dim) else "xla"
    if dense_logits_bytes(batch, heads, queries, keys) <= budget:
        return "cpu" if platform == "cpu" else "xla"
    return "blockwise"


# --- "cpu": the dense kernel tuned for XLA:CPU ---------------------------------------------------


def _dense_block(q: Array, k: Array, v: Array, scale: float, bias: Array | None = None,
                 keep: Array | None = None) -> Array:
    """``softmax(q k^T * scale + bias) v`` for heads-major (B, heads, T, d) blocks, normalising after the value
    product; ``keep`` (boolean, broadcast to the logits) drops the logits where it is False."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if keep is not None:
        logits = jnp.where(keep, logits, MASKED)
    p = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / p.sum(axis=-1)[..., None]).astype(v.dtype)


def query_chunk(batch: int, queries: int, heads: int, keys: int, budget: int = CPU_ATTENTION_BLOCK_BYTES) -> int:
    """Queries per block of the ``"cpu"`` kernel: all of them when the backend is not the CPU or the
    float32 logits fit ``budget`` bytes, else :data:`CPU_ATTENTION_QUERY_CHUNK`."""
    if jax.default_backend() != "cpu" or 4 * batch * heads * queries * keys <= budget:
        return queries
    return min(queries, CPU_ATTENTION_QUERY_CHUNK)


def _blocks(x: Array, size: int) -> Array:
    """(B, heads, T, d) -> (n, B, heads, size, d), zero-padding T up to a multiple of ``size``."""
    b, h, t, d = x.shape
    n = -(-t // size)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, n * size - t), (0, 0)))
    return jnp.moveaxis(x.reshape(b, h, n, size, d), 2, 0)


def _unblocks(x: Array, t: int) -> Array:
    """Inverse of :func:`_blocks`: (n, B, heads, size, d) -> (B, heads, t, d)."""
    n, b, h, size, d = x.shape
    return jnp.moveaxis(x, 0, 2).reshape(b, h, n * size, d)[:, :, :t]


def _cpu(q: Array, k: Array, v: Array, scale: float, chunk: int | None = None, extra: "_Extra | None" = None) -> Array:
    """Heads-major dense attention, queries in chunks of ``chunk`` (default :func:`query_chunk`)."""
    b, h, t, _ = q.shape
    chunk = chunk or query_chunk(b, t, h, k.shape[2])
    if chunk >= t:
        if extra is None:
            return _dense_block(q, k, v, scale)
        return _dense_block(q, k, v, scale, extra.bias, extra.keep(0, t, 0, k.shape[2]))
    if extra is None:
        out = jax.lax.map(lambda qc: _dense_block(qc, k, v, scale), _blocks(q, chunk))
    else:
        extra = extra.padded(-(-t // chunk) * chunk, k.shape[2])

        def one(block):
            qc, i = block
            return _dense_block(qc, k, v, scale, extra.bias_tile(i * chunk, chunk, 0, k.shape[2]),
                                extra.keep(i * chunk, chunk, 0, k.shape[2]))

        out = jax.lax.map(one, (_blocks(q, chunk), jnp.arange(-(-t // chunk))))
    return _unblocks(out, t)


# --- additive bias and boolean mask, tiled -------------------------------------------------------

# Logit of a masked (query, key) pair: finite, as jax.nn.dot_product_attention's, so a query whose keys are all
# masked averages the values instead of producing NaN; 0.7 of the largest float32 leaves room to subtract.
MASKED = float(-0.7 * jnp.finfo(jnp.float32).max)


def _as4(x: Array | None, name: str) -> Array | None:
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.ndim > 4:
        raise ValueError(f"attention {name} must broadcast to (B, heads, T_q, T_k); got shape {x.shape}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _pad_axis(x: Array, axis: int, size: int, value) -> Array:
    if x.shape[axis] in (1, size):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _tile(x: Array, q0, nq: int, k0, nk: int) -> Array:
    """Rows ``q0:q0+nq`` and columns ``k0:k0+nk`` of a (B|1, heads|1, T_q|1, T_k|1) array (size-1 axes kept)."""
    if x.shape[2] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, q0, nq, axis=2)
    if x.shape[3] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, k0, nk, axis=3)
    return x


@dataclasses.dataclass(frozen=True)
class _Extra:
    """An additive ``bias`` and a boolean ``mask`` (True: attend), each broadcastable to (B, heads, T_q, T_k) and
    kept in their own shapes, plus ``causal`` (key ``j`` visible to query ``i`` when ``j <= i``); the kernels ask
    for the tile of queries ``q0:q0+nq`` and keys ``k0:k0+nk``."""

    bias: Array | None
    mask: Array | None
    causal: bool

    def padded(self, tq: int, tk: int) -> "_Extra":
        """Bias and mask zero-/False-padded along their full-length axes to ``tq`` queries and ``tk`` keys."""
        pad = lambda x, value: None if x is None else _pad_axis(_pad_axis(x, 2, tq, value), 3, tk, value)  # noqa: E731
        return _Extra(pad(self.bias, 0), pad(self.mask, False), self.causal)

    def bias_tile(self, q0, nq: int, k0, nk: int) -> Array | None:
        return None if self.bias is None else _tile(self.bias, q0, nq, k0, nk)

    def keep(self, q0, nq: int, k0, nk: int) -> Array | None:
        keep = None if self.mask is None else _tile(self.mask, q0, nq, k0, nk).astype(bool)
        if self.causal:
            rows = q0 + jnp.arange(nq)[:, None]
            cols = k0 + jnp.arange(nk)[None, :]
            keep = cols <= rows if keep is None else keep & (cols <= rows)
        return keep


# --- "blockwise": online softmax over key blocks ---------------------------------------------------


def _blockwise(q: Array, k: Array, v: Array, scale: float, q_block: int, k_block: int,
               extra: _Extra | None = None) -> Array:
    """Heads-major attention with O(q_block * k_block) temporaries per head.

    For each query block, a scan over key blocks carries the running row maximum ``m``, the running
    sum ``l`` of ``exp(s - m)`` and the unnormalised output ``acc``; a new block with maximum ``m'``
    rescales both by ``exp(m - m')`` (Rabe & Staats 2021, Sec. 3; FlashAttention Alg. 1). Padded keys
    (when ``T_k`` is not a multiple of ``k_block``) are masked to ``-inf``; every block holds a real key.
    A bias and a mask (``extra``) are sliced per (query block, key block) tile; masked keys get the finite
    :data:`MASKED` logit, so a block of masked keys is wiped out by the rescale once a visible key is seen.
    """
    b, h, tq, _ = q.shape
    tk, dv = k.shape[2], v.shape[-1]
    q_block, k_block = min(q_block, tq), min(k_block, tk)
    kb, vb = _blocks(k, k_block), _blocks(v, k_block)
    n_k = kb.shape[0]
    padded = n_k * k_block != tk
    valid = (jnp.arange(n_k * k_block) < tk).reshape(n_k, k_block)
    qb = _blocks(q, q_block)
    if extra is not None:
        extra = extra.padded(qb.shape[0] * q_block, n_k * k_block)

    def one_query_block(block) -> Array:
        qc, qi = block if extra is not None else (block, None)

        def step(carry, block):
            m, l, acc = carry
            kc, vc, ok, ki = block if extra is not None else (*block, None)
            s = jnp.einsum("bhqd,bhkd->bhqk", qc, kc, preferred_element_type=jnp.float32) * scale
            if extra is not None:
                tile = (qi * q_block, q_block, ki * k_block, k_block)
                bias, keep = extra.bias_tile(*tile), extra.keep(*tile)
                if bias is not None:
                    s = s + bias.astype(jnp.float32)
                if keep is not None:
                    s = jnp.where(keep, s, MASKED)
            if padded:
                s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            rescale = jnp.exp(m - m_new)
            l = l * rescale + p.sum(axis=-1)
            acc = acc * rescale[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(vc.dtype), vc,
                                                        preferred_element_type=jnp.float32)
            return (m_new, l, acc), None

        rows = qc.shape[:3]
        init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
                jnp.zeros((*rows, dv), jnp.float32))
        xs = (kb, vb, valid) if extra is None else (kb, vb, valid, jnp.arange(n_k))
        (_, l, acc), _ = jax.lax.scan(step, init, xs)
        return (acc / l[..., None]).astype(v.dtype)

    xs = qb if extra is None else (qb, jnp.arange(qb.shape[0]))
    return _unblocks(jax.lax.map(one_query_block, xs), tq)


# --- the one entry point ----------------------------------------------------------------------------


def attention(q: Array, k: Array, v: Array, *, backend: str | None = None, scale: float | None = None,
              bias: Array | None = None, mask: Array | None = None, is_causal: bool = False,
              budget: int = DENSE_LOGITS_BUDGET, q_block: int | None = None,
              k_block: int = BLOCKWISE_KEY_BLOCK) -> Array:
    """``softmax(q k^T * scale + bias) v`` per head on (B, T, heads, d) arrays; returns (B, T_q, heads, d_v).

    ``scale`` defaults to ``d ** -0.5``. ``bias`` (additive, e.g. T5's relative positions) and ``mask``
    (boolean, True where a query may attend to a key, e.g. a padding mask ``(B, 1, 1, T_k)``) broadcast to
    ``(B, heads, T_q, T_k)``, as in ``jax.nn.dot_product_attention``; ``is_causal`` lets query ``i`` see keys
    ``j <= i`` only. A masked logit is a large finite negative number (:data:`MASKED`), so a query with every
    key masked averages the values, as ``jax.nn.dot_product_attention`` does. ``backend`` is one of
    :data:`BACKENDS` (``None``: the module default, see :func:`set_default_backend`); ``budget`` is the
    float32-logit size in bytes past which ``"auto"`` goes blockwise on CPU. ``q_block`` is the queries per
    block of the ``"cpu"`` kernel (default :func:`query_chunk`) and of ``"blockwise"`` (default
    :data:`BLOCKWISE_QUERY_BLOCK`); ``k_block`` the keys per blockwise scan step. The ``"cpu"`` and
    ``"blockwise"`` paths compute logits and softmax in float32 for any input dtype, and slice the bias and
    the mask per tile (their size-1 axes stay size 1: a padding mask is never expanded to ``T_q * T_k``).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention takes (B, T, heads, d) arrays; got shapes {q.shape}, {k.shape}, {v.shape}")
    name = _check_backend(backend or _default[0])
    b, tq, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    bias, mask = _as4(bias, "bias"), _as4(mask, "mask")
    mask = None if mask is None else mask.astype(bool)
    plain = bias is None and mask is None and not is_causal
    if is_causal and tq != k.shape[1]:
        raise ValueError(f"is_causal needs as many queries as keys (got {tq} and {k.shape[1]}); pass a mask instead")
    auto = name == "auto"
    if auto:
        name = choose_backend(b, h, tq, k.shape[1], d, q.dtype, budget=budget)
    extra_kw = {} if plain else dict(bias=None if bias is None else bias.astype(q.dtype), mask=mask,
                                     is_causal=is_causal)
    if name == "cudnn" and auto:
        try:  # jax checks cuDNN's version and the GPU's compute capability while tracing
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn", **extra_kw)
        except (NotImplementedError, RuntimeError, ValueError):
            name = "xla"
    if name in ("xla", "cudnn"):
        if name == "cudnn" and not (jax.default_backend() == "gpu" and _cudnn_applies(q.dtype, d)):
            raise ValueError(f"the cudnn attention backend needs a GPU, float16/bfloat16 and a head dim that is a "
                             f"multiple of 8 up to 128 (got {jax.default_backend()}, {q.dtype}, {d}); "
                             "use backend='xla' or 'auto'")
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=name, **extra_kw)
    extra = None if plain else _Extra(bias, mask, is_causal)
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # heads-major: 1.1-1.8x faster on XLA:CPU
    if name == "cpu":
        out = _cpu(q, k, v, scale, q_block, extra)
    else:
        out = _blockwise(q, k, v, scale, q_block or BLOCKWISE_QUERY_BLOCK, k_block, extra)
    return jnp.swapaxes(out, 1, 2)


def dense_logits_bytes(batch: int, heads: int, queries: int, keys: int) -> int:
    """Bytes of the full float32 logits ``(B, heads, T_q, T_k)`` (what ``budget`` is compared with)."""
    return 4 * math.prod((batch, heads, queries, keys))
