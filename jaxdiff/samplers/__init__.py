"""Samplers: small pure ``init`` / ``step`` objects run by :func:`jaxdiff.sampling.sample`."""
from __future__ import annotations

from typing import Any, Callable

from jaxdiff.samplers._base import Sampler as Sampler
from jaxdiff.samplers._base import ancestral_split as ancestral_split
from jaxdiff.samplers._base import prepare as prepare
from jaxdiff.samplers.ddpm import DDPM as DDPM
from jaxdiff.samplers.dopri5 import Dopri5 as Dopri5
from jaxdiff.samplers.dopri5 import Dopri5State as Dopri5State
from jaxdiff.samplers.dpmpp_2m import DPMSolverPP2M as DPMSolverPP2M
from jaxdiff.samplers.dpmpp_2m_sde import DPMSolverPP2MSDE as DPMSolverPP2MSDE
from jaxdiff.samplers.euler import DDIM as DDIM
from jaxdiff.samplers.euler import Euler as Euler
from jaxdiff.samplers.euler import EulerAncestral as EulerAncestral
from jaxdiff.samplers.heun import Heun as Heun
from jaxdiff.samplers.langevin import Langevin as Langevin
from jaxdiff.samplers.pc import PredictorCorrector as PredictorCorrector
from jaxdiff.samplers.resample import Resample as Resample
from jaxdiff.samplers.unipc import UniPC as UniPC

SAMPLERS: dict[str, Callable[..., Any]] = {
    "euler": Euler,
    "euler_ancestral": EulerAncestral,
    "ddim": DDIM,
    "ddpm": DDPM,
    "heun": Heun,
    "dpmpp_2m": DPMSolverPP2M,
    "dpmpp_2m_sde": DPMSolverPP2MSDE,
    "unipc": UniPC,
    "langevin": Langevin,
    "pc": PredictorCorrector,
    "dopri5": Dopri5,
}


def get_sampler(name: str, **options: Any) -> Any:
    """Build a sampler by name; an unknown name lists the valid ones, an unknown option those it takes."""
    try:
        factory = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(sorted(SAMPLERS))}") from None
    try:
        return factory(**options)
    except TypeError as e:
        import dataclasses

        valid = ", ".join(f.name for f in dataclasses.fields(factory)) or "none"
        raise ValueError(f"invalid options {sorted(options)} for sampler {name!r} ({e}); valid options: {valid}") from None
