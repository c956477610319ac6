"""Hand-built AUTOMATIC1111-style hypernetwork files (torch.save of the format's dict, from its description) and
diffusers attention processors applying the same context transform in torch: the independent references."""
from __future__ import annotations

import torch

CASES = {  # layer_structure, activation (torch module), layer norm, activate_output, dropout_structure
    "relu_norm_dropout": ([1, 2, 1], "relu", torch.nn.ReLU, True, False, [0, 0.3, 0]),
    "swish_output_odd": ([1, 1.5, 1], "swish", torch.nn.Hardswish, False, True, None),
}


def torch_mlp(width, structure, act, norm, activate_output, dropout, g):
    """A torch Sequential laid out as the format describes: Linear, activation (not after the last Linear unless
    activate_output), LayerNorm, Dropout; random weights and norms."""
    mods = []
    for i in range(len(structure) - 1):
        d_in, d_out = int(width * structure[i]), int(width * structure[i + 1])
        mods.append(torch.nn.Linear(d_in, d_out))
        if i < len(structure) - 2 or activate_output:
            mods.append(act())
        if norm:
            mods.append(torch.nn.LayerNorm(d_out))
        if dropout and dropout[i + 1] > 0:
            mods.append(torch.nn.Dropout(dropout[i + 1]))
    seq = torch.nn.Sequential(*mods)
    with torch.no_grad():
        for p in seq.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if p.ndim == 1 and norm else 0.0))
    return seq.eval()


def write_file(path, case: str, widths, seed=0):
    """torch.save of the format's dict (each module's Sequential is its ``linear`` attribute); returns the torch
    MLPs {width: (keys, values)}."""
    structure, name, act, norm, out, dropout = CASES[case]
    g = torch.Generator().manual_seed(seed)
    mlps = {w: tuple(torch_mlp(w, structure, act, norm, out, dropout, g) for _ in range(2)) for w in widths}
    data = {w: [{f"linear.{k}": v for k, v in m.state_dict().items()} for m in pair] for w, pair in mlps.items()}
    data.update(layer_structure=structure, activation_func=name, is_layer_norm=norm, activate_output=out,
                use_dropout=dropout is not None, dropout_structure=dropout, last_layer_dropout=False,
                weight_initialization="Normal", name=case, step=7, sd_checkpoint=None, sd_checkpoint_name=None)
    torch.save(data, path)
    return mlps


def hyper_processors(model, mlps, strength):
    """diffusers attention with the context transform done in torch: keys read ``c + s * f_k(c)`` and values
    ``c + s * f_v(c)`` when ``c``'s width has MLPs (``c`` the text, or the hidden states in self-attention)."""
    from diffusers.models.attention_processor import Attention

    class Hyper:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
            assert hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
            assert not attn.residual_connection and attn.rescale_output_factor == 1.0 and attention_mask is None
            ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            ck = cv = ctx
            if ctx.shape[-1] in mlps:
                fk, fv = mlps[ctx.shape[-1]]
                ck, cv = ctx + strength * fk(ctx), ctx + strength * fv(ctx)
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key, value = attn.head_to_batch_dim(attn.to_k(ck)), attn.head_to_batch_dim(attn.to_v(cv))
            out = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(q, key, None), value))
            return attn.to_out[1](attn.to_out[0](out))

    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(Hyper())
