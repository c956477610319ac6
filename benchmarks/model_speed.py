"""Forward time and memory of jaxdiff's networks against diffusers / transformers, on the same weights.

For the conditional U-Net (one CFG-sized batch), the VAE decoder and the CLIP text encoder, at two
sizes (``tiny`` and ``mid``: U-Net block channels 64/128/256 on 32x32 latents, a VAE decoding
32x32 latents to 256x256, a 6-layer width-512 CLIP text encoder): the PyTorch reference is built
with a fixed seed, saved with ``save_pretrained`` and loaded by jaxdiff from that folder. Each
forward is timed interleaved (one jaxdiff call, one PyTorch call, repeated; medians), both
frameworks pinned to the same cores (``--threads N``: this process's CPU affinity is the first N cores it
may use, set before jax and torch start their pools, and torch uses N threads; the affinity is in the
JSON). Also reports the peak RSS increase of one
forward, the outputs' max abs difference, and the peak RSS increase while loading the mid U-Net
from its folder (in a fresh subprocess) divided by its parameter bytes, and the time to build the
full-size DiT-XL/2, CLIP ViT-L/14 text, T5-XXL encoder and SD 1.5 U-Net abstractly.

Keys: ``unet_time_ratio`` (jaxdiff / PyTorch U-Net forward, mid size; target <= 1),
``load_memory_ratio`` (first load in a fresh process; target <= 1.3), ``cases``, ``load_memory``,
``abstract_build``. The machine's load average is recorded at the start and end: on a shared machine
use ``--threads 1`` (the default), as PyTorch's OpenMP pool degrades badly when cores are contended.
jaxdiff runs as it does by default: one CPU device per pinned core, the U-Net's batch split over them
(``JAXDIFF_CPU_DEVICES=1`` for a single device); ``benchmarks/thread_scaling.py`` compares both.

Usage: ``python benchmarks/model_speed.py [--sizes tiny,mid] [--threads 1] [--repeats 7] [--json PATH]``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's jaxdiff
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, machine, parser, pin_cores  # noqa: E402

# The cores must be pinned before jax (XLA) and torch size their thread pools (XLA from the affinity).
_THREADS = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
if _THREADS is None and "--threads" in sys.argv:
    _THREADS = sys.argv[sys.argv.index("--threads") + 1]
_THREADS = int(_THREADS or os.environ.get("MODEL_SPEED_THREADS", "1"))
_CORES = pin_cores(_THREADS) if __name__ == "__main__" else sorted(os.sched_getaffinity(0))
import jaxdiff  # noqa: E402,F401 (chooses one CPU device per pinned core before the backend starts)

import json  # noqa: E402
from pathlib import Path  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

# --- configurations ------------------------------------------------------------------------------

UNET = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, sample_size=8),
    "mid": dict(block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=512, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32,
                sample_size=32),
}
VAE = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent=8),
    "mid": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32, latent=32),
}
CLIP = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, length=16),
    "mid": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, length=77),
}
UNET_BATCH = 2  # a classifier-free-guidance batch


def build_unet(size: str):
    import diffusers

    c = dict(UNET[size])
    return diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **c), c


def build_vae(size: str):
    import diffusers

    c = dict(VAE[size])
    n = len(c["block_out_channels"])
    model = diffusers.AutoencoderKL(block_out_channels=c["block_out_channels"], layers_per_block=c["layers_per_block"],
                                    norm_num_groups=c["norm_num_groups"], latent_channels=4,
                                    down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    return model, c


def build_clip(size: str):
    import transformers

    c = dict(CLIP[size])
    length = c.pop("length")
    cfg = transformers.CLIPTextConfig(vocab_size=1000, max_position_embeddings=max(77, length), hidden_act="quick_gelu",
                                      **c)
    return transformers.CLIPTextModel(cfg), {**c, "length": length}


# --- one case: (torch callable, jax callable, description) ---------------------------------------


def _torch_model(build: Callable, size: str, seed: int):
    import torch

    torch.manual_seed(seed)
    model, cfg = build(size)
    return model.eval(), cfg


def _save_and_load(model: Any, folder: Path):
    from jaxdiff.convert import load_model_folder

    model.save_pretrained(folder, safe_serialization=True)
    return load_model_folder(folder)


def make_case(kind: str, size: str, folder: Path) -> dict[str, Any]:
    """Torch and jaxdiff forwards for one network and size, with their inputs bound."""
    import torch

    from jaxdiff import parallel
    from jaxdiff.models._pure import PureModel

    rng = np.random.default_rng(0)
    builder = {"unet": build_unet, "vae_decoder": build_vae, "clip_text": build_clip}[kind]
    tmodel, cfg = _torch_model(builder, size, seed=0)
    jmodule = _save_and_load(tmodel, folder / f"{kind}_{size}")
    params = sum(p.numel() for p in tmodel.parameters())
    if kind == "unet":
        s = cfg["sample_size"]
        x = rng.standard_normal((UNET_BATCH, 4, s, s), np.float32)
        ctx = rng.standard_normal((UNET_BATCH, 77, cfg["cross_attention_dim"]), np.float32)
        t = np.array([500.0, 500.0], np.float32)
        tx, tt, tc = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)
        torch_fn = lambda: tmodel(tx, tt, tc).sample  # noqa: E731
        jfn = jax.jit(lambda m, a, b, c: m(a, b, c))
        args = (PureModel.of(jmodule), np.transpose(x, (0, 2, 3, 1)), t, ctx)
        mesh = parallel.batch_mesh(UNET_BATCH)
        if mesh is not None:  # jaxdiff's default with several CPU devices: the batch split, the weights replicated
            batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.DATA))
            args = (parallel.shard_params(args[0], mesh), *(jax.device_put(a, batch) for a in args[1:]))
        shape = f"{UNET_BATCH}x{s}x{s}x4, text 77x{cfg['cross_attention_dim']}, {jax.device_count()} CPU device(s)"
    elif kind == "vae_decoder":
        s = cfg["latent"]
        z = rng.standard_normal((1, 4, s, s), np.float32)
        tz = torch.from_numpy(z)
        torch_fn = lambda: tmodel.decode(tz).sample  # noqa: E731
        jfn = jax.jit(lambda m, a: m(a))
        args = (PureModel.of(jmodule).bind("decode"), np.transpose(z, (0, 2, 3, 1)))
        f = 2 ** (len(cfg["block_out_channels"]) - 1)
        shape = f"1x{s}x{s}x4 -> {s * f}x{s * f}"
    else:
        ids = rng.integers(0, 999, (1, cfg["length"])).astype(np.int64)
        tids = torch.from_numpy(ids)
        torch_fn = lambda: tmodel(tids).last_hidden_state  # noqa: E731
        jfn = jax.jit(lambda m, a: m(a).last_hidden_state)
        args = (PureModel.of(jmodule), ids.astype(np.int32))
        shape = f"1x{cfg['length']} tokens"
    return {"torch": torch_fn, "jit": jfn, "args": args, "params": params, "input": shape}


def _jax_call(fn: Callable) -> np.ndarray:
    return np.asarray(jax.block_until_ready(fn()))


def _torch_call(fn: Callable) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return fn().numpy()


def measure(case: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Interleaved median forward times, peak memory of a first forward, and the outputs' difference.

    Memory: the peak RSS increase of each framework's first forward call (jaxdiff's after
    compiling, which is not counted); later calls reuse the allocators' cached memory and show
    nothing. XLA's own account of its temporary buffers is given too.
    """
    from jaxdiff.convert.memory import peak_rss_during

    t0 = time.perf_counter()
    compiled = case["jit"].lower(*case["args"]).compile()
    compile_s = time.perf_counter() - t0
    case["jax"] = lambda: compiled(*case["args"])
    mem = compiled.memory_analysis()
    out_j, jax_peak = peak_rss_during(_jax_call, case["jax"])
    out_t, torch_peak = peak_rss_during(_torch_call, case["torch"])
    if out_j.ndim == 4:
        out_j = np.transpose(out_j, (0, 3, 1, 2))
    diff = float(np.abs(out_j - out_t).max())
    times: dict[str, list[float]] = {"jax": [], "torch": []}
    for _ in range(repeats):
        for name, call in (("jax", _jax_call), ("torch", _torch_call)):
            t = time.perf_counter()
            call(case[name])
            times[name].append(time.perf_counter() - t)
    tj, tt = statistics.median(times["jax"]), statistics.median(times["torch"])
    return {
        "input": case["input"], "params": case["params"],
        "jax_ms": 1e3 * tj, "torch_ms": 1e3 * tt, "time_ratio": tj / tt,
        "jax_ms_min": 1e3 * min(times["jax"]), "torch_ms_min": 1e3 * min(times["torch"]),
        "jax_compile_s": compile_s,
        "jax_forward_peak_mib": jax_peak / 2**20, "torch_forward_peak_mib": torch_peak / 2**20,
        "xla_temp_mib": getattr(mem, "temp_size_in_bytes", 0) / 2**20,
        "max_abs_diff": diff, "max_abs_ref": float(np.abs(out_t).max()),
    }


# --- loading memory ------------------------------------------------------------------------------

_LOAD_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
import jax, jax.numpy as jnp, numpy as np
from jaxdiff.convert import count_params, load_model_folder
from jaxdiff.convert.memory import peak_rss_during
jnp.zeros(1).block_until_ready()  # start the backend before measuring
model, peak = peak_rss_during(load_model_folder, sys.argv[1])
nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(__import__("flax").nnx.state(model)))
# Again, the first copy kept (so freed pages are not reused) and JAX's tracing caches filled.
second, warm = peak_rss_during(load_model_folder, sys.argv[1])
print(json.dumps({"peak_bytes": peak, "warm_peak_bytes": warm, "param_bytes": nbytes,
                  "params": count_params(model)}))
"""


def load_memory(folder: Path) -> dict[str, Any]:
    """Peak RSS increase while ``load_model_folder`` reads ``folder``, measured in a fresh process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(folder), root], check=True, capture_output=True,
                         text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {**r, "file_bytes": file_bytes, "ratio": r["peak_bytes"] / r["param_bytes"],
            "warm_ratio": r["warm_peak_bytes"] / r["param_bytes"]}


# --- abstract construction ----------------------------------------------------------------------

ABSTRACT_CASES = {  # name: (module, class, config file in jaxdiff/models/configs)
    "dit_xl_2_256": ("jaxdiff.models.dit", "DiTTransformer2DModel", "dit_xl_2_256.json"),
    "clip_vit_l14_text": ("jaxdiff.models.clip", "CLIPTextModel", "clip_vit_l14_text.json"),
    "t5_v1_1_xxl_encoder": ("jaxdiff.models.t5", "T5EncoderModel", "t5_v1_1_xxl_encoder.json"),
    "sd15_unet": ("jaxdiff.models.unet", "UNet2DConditionModel", "sd15_unet.json"),
}

_ABSTRACT_SCRIPT = r"""
import importlib, json, sys, time
sys.path.insert(0, sys.argv[1])
from flax import nnx
from jaxdiff.convert.torch_layout import abstract, count_params
mod, name, cfg_file = sys.argv[2:5]
cls = getattr(importlib.import_module(mod), name)
from jaxdiff.convert.folders import config_class
cfg = config_class(cls).from_dict(json.load(open(cfg_file)))
w, c = time.perf_counter(), time.process_time()
model = abstract(lambda: cls(cfg, rngs=nnx.Rngs(0)))
print(json.dumps({"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c, "params": count_params(model)}))
"""


def abstract_times(repeats: int) -> dict[str, Any]:
    """Seconds to build each full-size network abstractly (``torch_layout.abstract``), each in a fresh
    process (median of ``repeats``); CPU seconds too, which the machine's load disturbs less."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for name, (mod, cls, cfg) in ABSTRACT_CASES.items():
        runs = []
        for _ in range(repeats):
            cmd = [sys.executable, "-c", _ABSTRACT_SCRIPT, root, mod, cls, os.path.join(root, "jaxdiff/models/configs", cfg)]
            runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        out[name] = {"wall_s": statistics.median(r["wall_s"] for r in runs),
                     "cpu_s": statistics.median(r["cpu_s"] for r in runs), "params": runs[0]["params"]}
        print(name, out[name], flush=True)
    return out


def _uptime() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sizes", default="tiny,mid")
    p.add_argument("--networks", default="unet,vae_decoder,clip_text")
    p.add_argument("--threads", type=int, default=_THREADS,
                   help="cores for both frameworks: the process is pinned to that many (CPU affinity), torch uses "
                        "that many threads; default 1")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--abstract-repeats", type=int, default=3,
                   help="fresh-process runs per full-size abstract build (0: skip that part)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"benchmark": "model_speed", "machine": machine(), "threads": args.threads,
                               "affinity": sorted(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
                               "torch": torch.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                               "load_average_start": _uptime(), "repeats": args.repeats, "cases": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            for kind in args.networks.split(","):
                reps = args.repeats * (3 if size == "tiny" else 1)  # millisecond calls: more samples
                r = measure(make_case(kind, size, Path(tmp)), reps)
                results["cases"][f"{kind}/{size}"] = r
                rows.append({"network": kind, "size": size, "jax_ms": r["jax_ms"], "torch_ms": r["torch_ms"],
                             "ratio": r["time_ratio"], "jax_peak_MiB": r["jax_forward_peak_mib"],
                             "torch_peak_MiB": r["torch_forward_peak_mib"], "xla_temp_MiB": r["xla_temp_mib"],
                             "max_abs_diff": r["max_abs_diff"]})
                print(rows[-1], flush=True)
        if "mid" in args.sizes.split(",") and "unet" in args.networks.split(","):
            results["unet_time_ratio"] = results["cases"]["unet/mid"]["time_ratio"]
            mem = load_memory(Path(tmp) / "unet_mid")
            results["load_memory"] = mem
            results["load_memory_ratio"] = mem["ratio"]
    if args.abstract_repeats:
        results["abstract_build"] = abstract_times(args.abstract_repeats)
    results["load_average_end"] = _uptime()
    emit(results, rows, args.json)


if __name__ == "__main__":
    main()
