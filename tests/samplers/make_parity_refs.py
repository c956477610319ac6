"""Write tests/data/parity/sd_schedulers.npz: diffusers' trajectories for the parity cases.

Run from the repository root with torch and diffusers installed:
    python tests/samplers/make_parity_refs.py
For every case and spacing it stores the diffusers timesteps, its sigmas (where it has them) and the
sample after every completed step in the scheduler's own coordinates (VP for DDPM/DDIM/DPM/UniPC,
VE-scaled for the Euler family). The noise each step draws is jaxdiff's, injected by replacing the
scheduler module's ``randn_tensor``.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import parity_common as pc  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "data", "parity", "sd_schedulers.npz")


def diffusers_trajectory(case: str, spacing: str) -> dict[str, np.ndarray]:
    import diffusers

    cls_name, extra, _, _ = pc.CASES[case]
    cls = getattr(diffusers, cls_name)
    sched = cls(**pc.SD_CONFIG, timestep_spacing=spacing, **extra)
    sched.set_timesteps(pc.STEPS)
    traj, timesteps = pc.run_diffusers_scheduler(sched)
    out = {"traj": traj, "timesteps": timesteps.astype(np.float64)}
    if hasattr(sched, "sigmas"):
        out["sigmas"] = sched.sigmas.numpy().astype(np.float32)
    return out


def main() -> None:
    arrays = {}
    for case in pc.CASES:
        for spacing in pc.SPACINGS:
            for k, v in diffusers_trajectory(case, spacing).items():
                arrays[f"{case}/{spacing}/{k}"] = v
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {len(arrays)} arrays to {OUT}")


if __name__ == "__main__":
    main()
