"""Attention layers: ``Attention``, feed-forwards, ``BasicTransformerBlock``, ``Transformer2DModel``
and the pixel / VAE ``spatial_attention`` (diffusers ``attention.py`` / ``transformer_2d.py``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.attention import attention
from jaxdiff.models.attention_control import ControlRun, Site
from jaxdiff.models.layers.make import Identity, Maker

Array = jax.Array


class Attention(nnx.Module):
    """Multi-head (self or cross) attention, diffusers ``Attention`` with the default processor.

    ``softmax(q k^T / sqrt(dim_head)) v`` per head (Vaswani et al. 2017); on CPU (the ``"cpu"`` and
    ``"blockwise"`` backends) logits and softmax are computed in float32, so ``upcast_attention`` /
    ``upcast_softmax`` hold for any dtype.
    On 4-D NHWC input (the VAE / pixel U-Net attention) it flattens the pixels, applies the
    optional ``group_norm`` first and, with ``residual_connection``, adds the input back and
    divides by ``rescale_output_factor``. The kernel is :func:`jaxdiff.models.attention.attention`;
    ``attention_backend`` fixes its backend for this layer (``None``: the module default).
    ``site`` (static; its path set by :func:`~jaxdiff.models.attention_control.assign_sites`) is where
    an attention ``control`` acts; ``hw`` is the query grid of a flattened 3-D input.
    """

    def __init__(self, query_dim: int, mk: Maker, *, heads: int = 8, dim_head: int = 64,
                 cross_attention_dim: int | None = None, bias: bool = False, out_bias: bool = True,
                 norm_num_groups: int | None = None, eps: float = 1e-5, residual_connection: bool = False,
                 rescale_output_factor: float = 1.0, attention_backend: str | None = None):
        inner = heads * dim_head
        self.heads = heads
        self.site = Site("", "cross" if cross_attention_dim else "self", heads)
        self.attention_backend = attention_backend
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = mk.group_norm(query_dim, norm_num_groups, eps) if norm_num_groups else None
        kv_dim = cross_attention_dim or query_dim
        self.to_q = mk.linear(query_dim, inner, bias=bias)
        self.to_k = mk.linear(kv_dim, inner, bias=bias)
        self.to_v = mk.linear(kv_dim, inner, bias=bias)
        self.to_out = nnx.List([mk.linear(inner, query_dim, bias=out_bias), Identity()])

    def __call__(self, x: Array, context: Array | None = None, control: ControlRun | None = None,
                 hw: tuple[int, int] | None = None, bias: Array | None = None) -> Array:
        """``bias`` (optional) is added to the logits, broadcast to (B, heads, T_q, T_k) (e.g. a relative
        position bias, :class:`~jaxdiff.models.layers.temporal.RelativePositionBias`)."""
        residual = x
        spatial = x.ndim == 4
        if spatial:
            b, h, w, c = x.shape
            x, hw = x.reshape(b, h * w, c), (h, w)
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        ck = cv = context
        if control is not None:
            ck, cv = control.context(self.site, hw, context)
        q, k, v = self.to_q(x), self.to_k(ck), self.to_v(cv)
        split = lambda t: t.reshape(*t.shape[:2], self.heads, t.shape[-1] // self.heads)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        if control is not None and control.explicit(self.site, hw):
            if bias is not None:
                raise ValueError(f"attention controls that edit or record probabilities do not take a logit bias "
                                 f"(site {self.site.path!r} has a relative position bias); select other sites")
            out = control.attend(self.site, hw, q, k, v)
        else:
            out = attention(q, k, v, backend=self.attention_backend, bias=bias)
        out = self.to_out[0](out.reshape(*out.shape[:2], -1))
        if spatial:
            out = out.reshape(b, h, w, c)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out


class GEGLU(nnx.Module):
    """``a * gelu(b)`` with ``[a, b] = proj(x)`` (Shazeer 2020), diffusers ``GEGLU``."""

    def __init__(self, dim_in: int, dim_out: int, mk: Maker, *, bias: bool = True):
        self.proj = mk.linear(dim_in, 2 * dim_out, bias=bias)

    def __call__(self, x: Array) -> Array:
        a, gate = jnp.split(self.proj(x), 2, axis=-1)
        return a * jax.nn.gelu(gate, approximate=False)


class GELUProj(nnx.Module):
    """``gelu(proj(x))`` (diffusers ``GELU`` with ``approximate`` none or tanh)."""

    def __init__(self, dim_in: int, dim_out: int, mk: Maker, *, approximate: bool = False, bias: bool = True):
        self.proj = mk.linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def __call__(self, x: Array) -> Array:
        return jax.nn.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nnx.Module):
    """``net[2](net[0](x))``: diffusers ``FeedForward`` (index 1 is the dropout slot)."""

    def __init__(self, dim: int, mk: Maker, *, mult: int = 4, activation_fn: str = "geglu",
                 inner_dim: int | None = None, bias: bool = True):
        inner = inner_dim or dim * mult
        if activation_fn == "geglu":
            first = GEGLU(dim, inner, mk, bias=bias)
        elif activation_fn in ("gelu", "gelu-approximate"):
            first = GELUProj(dim, inner, mk, approximate=activation_fn == "gelu-approximate", bias=bias)
        else:
            raise ValueError(f"unsupported feed-forward activation_fn {activation_fn!r}; "
                             "use 'geglu', 'gelu' or 'gelu-approximate'")
        self.net = nnx.List([first, Identity(), mk.linear(inner, dim, bias=bias)])

    def __call__(self, x: Array) -> Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention and feed-forward, each pre-LayerNorm with a residual.

    diffusers ``BasicTransformerBlock`` with ``norm_type="layer_norm"`` (Stable Diffusion).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, mk: Maker, *, cross_attention_dim: int | None = None,
                 activation_fn: str = "geglu", attention_bias: bool = False, norm_eps: float = 1e-5,
                 only_cross_attention: bool = False):
        self.only_cross_attention = only_cross_attention
        self.norm1 = mk.layer_norm(dim, norm_eps)
        self.attn1 = Attention(dim, mk, heads=heads, dim_head=dim_head, bias=attention_bias,
                               cross_attention_dim=cross_attention_dim if only_cross_attention else None)
        self.norm2 = mk.layer_norm(dim, norm_eps)
        self.attn2 = Attention(dim, mk, heads=heads, dim_head=dim_head, bias=attention_bias,
                               cross_attention_dim=cross_attention_dim)
        self.norm3 = mk.layer_norm(dim, norm_eps)
        self.ff = FeedForward(dim, mk, activation_fn=activation_fn)

    def __call__(self, x: Array, context: Array | None = None, control: ControlRun | None = None,
                 hw: tuple[int, int] | None = None, self_bias: Array | None = None) -> Array:
        """``self_bias`` (optional) is a logit bias for the self-attentions (``attn1``, and ``attn2`` when it
        attends to ``x`` itself, as the temporal transformers' do)."""
        self1 = not self.only_cross_attention
        self2 = context is None
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None, control, hw,
                           bias=self_bias if self1 else None)
        x = x + self.attn2(self.norm2(x), context, control, hw, bias=self_bias if self2 else None)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """Spatial transformer of latent diffusion (Rombach et al. 2022), diffusers ``Transformer2DModel``.

    GroupNorm, ``proj_in`` (1x1 conv, or a Linear when ``use_linear_projection`` as in SD 2),
    ``transformer_blocks`` over the flattened pixels, ``proj_out``, plus the input. The blocks run
    at width ``heads * dim_head``, which need not equal ``in_channels`` (diffusers allows it).
    """

    def __init__(self, heads: int, dim_head: int, in_channels: int, mk: Maker, *, num_layers: int = 1,
                 cross_attention_dim: int | None = None, norm_num_groups: int = 32,
                 use_linear_projection: bool = False, only_cross_attention: bool = False):
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = mk.group_norm(in_channels, norm_num_groups, 1e-6)
        if use_linear_projection:
            self.proj_in = mk.linear(in_channels, inner)
            self.proj_out = mk.linear(inner, in_channels)
        else:
            self.proj_in = mk.conv(in_channels, inner, 1)
            self.proj_out = mk.conv(inner, in_channels, 1)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, dim_head, mk, cross_attention_dim=cross_attention_dim,
                                  only_cross_attention=only_cross_attention)
            for _ in range(num_layers)
        ])

    def __call__(self, x: Array, context: Array | None = None, control: ControlRun | None = None) -> Array:
        b, h, w, _ = x.shape
        hs = self.proj_in(self.norm(x))  # a 1x1 conv and a Linear both act on the last axis
        hs = hs.reshape(b, h * w, hs.shape[-1])
        for block in self.transformer_blocks:
            hs = block(hs, context, control, (h, w))
        hs = self.proj_out(hs.reshape(b, h, w, hs.shape[-1]))
        return hs + x


def spatial_attention(channels: int, mk: Maker, *, head_dim: int, groups: int | None, eps: float,
                      rescale_output_factor: float = 1.0) -> Attention:
    """The self-attention of diffusers' pixel / VAE blocks (``_from_deprecated_attn_block``).

    As in diffusers' ``AttnDownBlock2D`` / ``UNetMidBlock2D``, ``heads = channels // head_dim``
    heads of ``head_dim`` each: when ``head_dim`` does not divide ``channels`` the queries, keys
    and values are ``heads * head_dim`` wide (narrower than ``channels``) and ``to_out`` maps
    back to ``channels``.
    """
    if not 0 < head_dim <= channels:
        raise ValueError(f"attention_head_dim {head_dim} must be between 1 and the block's {channels} channels")
    return Attention(channels, mk, heads=channels // head_dim, dim_head=head_dim, bias=True,
                     norm_num_groups=groups, eps=eps, residual_connection=True,
                     rescale_output_factor=rescale_output_factor)
