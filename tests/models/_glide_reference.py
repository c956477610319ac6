"""An independent enumeration of openai/glide-text2im's parameter names and shapes, written from the
architecture definition (``UNetModel.__init__`` / ``Text2ImUNet.__init__``): the truth the converter and the
abstract model are checked against (no jaxdiff code involved)."""
from __future__ import annotations


def _res(p: str, cin: int, cout: int, emb: int) -> dict[str, tuple[int, ...]]:
    out = {f"{p}.in_layers.0.weight": (cin,), f"{p}.in_layers.0.bias": (cin,),
           f"{p}.in_layers.2.weight": (cout, cin, 3, 3), f"{p}.in_layers.2.bias": (cout,),
           f"{p}.emb_layers.1.weight": (2 * cout, emb), f"{p}.emb_layers.1.bias": (2 * cout,),
           f"{p}.out_layers.0.weight": (cout,), f"{p}.out_layers.0.bias": (cout,),
           f"{p}.out_layers.3.weight": (cout, cout, 3, 3), f"{p}.out_layers.3.bias": (cout,)}
    if cin != cout:
        out.update({f"{p}.skip_connection.weight": (cout, cin, 1, 1), f"{p}.skip_connection.bias": (cout,)})
    return out


def _attn(p: str, c: int, enc: int) -> dict[str, tuple[int, ...]]:
    return {f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,), f"{p}.qkv.weight": (3 * c, c, 1),
            f"{p}.qkv.bias": (3 * c,), f"{p}.encoder_kv.weight": (2 * c, enc, 1), f"{p}.encoder_kv.bias": (2 * c,),
            f"{p}.proj_out.weight": (c, c, 1), f"{p}.proj_out.bias": (c,)}


def openai_layout(image_size: int, mc: int, mult: tuple[int, ...], nres: int, attn_res: tuple[int, ...],
                  in_ch: int, text_ctx: int, width: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    emb = 4 * mc
    attn_ds = {image_size // r for r in attn_res}
    s: dict[str, tuple[int, ...]] = {"time_embed.0.weight": (emb, mc), "time_embed.0.bias": (emb,),
                                     "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,)}
    ch = mc * mult[0]
    s.update({"input_blocks.0.0.weight": (ch, in_ch, 3, 3), "input_blocks.0.0.bias": (ch,)})
    chans, ds, k = [ch], 1, 1
    for level, m in enumerate(mult):
        for _ in range(nres):
            s.update(_res(f"input_blocks.{k}.0", ch, m * mc, emb))
            ch = m * mc
            if ds in attn_ds:
                s.update(_attn(f"input_blocks.{k}.1", ch, width))
            chans.append(ch)
            k += 1
        if level != len(mult) - 1:
            s.update(_res(f"input_blocks.{k}.0", ch, ch, emb))
            chans.append(ch)
            ds *= 2
            k += 1
    s.update(_res("middle_block.0", ch, ch, emb))
    s.update(_attn("middle_block.1", ch, width))
    s.update(_res("middle_block.2", ch, ch, emb))
    k = 0
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nres + 1):
            s.update(_res(f"output_blocks.{k}.0", ch + chans.pop(), m * mc, emb))
            ch = m * mc
            sub = 1
            if ds in attn_ds:
                s.update(_attn(f"output_blocks.{k}.1", ch, width))
                sub = 2
            if level and i == nres:
                s.update(_res(f"output_blocks.{k}.{sub}", ch, ch, emb))
                ds //= 2
            k += 1
    s.update({"out.0.weight": (ch,), "out.0.bias": (ch,), "out.2.weight": (6, mc * mult[0], 3, 3), "out.2.bias": (6,)})
    s.update({"token_embedding.weight": (vocab, width), "positional_embedding": (text_ctx, width),
              "padding_embedding": (text_ctx, width), "final_ln.weight": (width,), "final_ln.bias": (width,),
              "transformer_proj.weight": (emb, width), "transformer_proj.bias": (emb,)})
    for n in range(layers):
        p = f"transformer.resblocks.{n}"
        s.update({f"{p}.attn.c_qkv.weight": (3 * width, width), f"{p}.attn.c_qkv.bias": (3 * width,),
                  f"{p}.attn.c_proj.weight": (width, width), f"{p}.attn.c_proj.bias": (width,),
                  f"{p}.ln_1.weight": (width,), f"{p}.ln_1.bias": (width,),
                  f"{p}.mlp.c_fc.weight": (4 * width, width), f"{p}.mlp.c_fc.bias": (4 * width,),
                  f"{p}.mlp.c_proj.weight": (width, 4 * width), f"{p}.mlp.c_proj.bias": (width,),
                  f"{p}.ln_2.weight": (width,), f"{p}.ln_2.bias": (width,)})
    return s


BASE = dict(image_size=64, mc=192, mult=(1, 2, 3, 4), nres=3, attn_res=(32, 16, 8), in_ch=3, text_ctx=128,
            width=512, layers=16, vocab=50257)
UPSAMPLER = dict(BASE, image_size=256, mult=(1, 1, 2, 2, 4, 4), nres=2, in_ch=6)
