"""From a diffusers ``scheduler_config.json`` to jaxdiff's training schedule, sampler and noise levels.

A diffusers scheduler bundles three things jaxdiff keeps apart: the *training* discretisation
(``alphas_cumprod`` from the beta schedule, and the prediction type), a *sampler* (DDIM, Euler,
DPM-Solver++...) and the *noise levels* it visits. :func:`training_schedule` reads the first,
:data:`SAMPLER_OF_SCHEDULER` names jaxdiff's equivalent of each scheduler class, and :func:`plan`
builds the sampler and its levels, reproducing diffusers' timesteps exactly by default (the schedule
``"default"``) so that a pipeline gives diffusers' images, or any schedule of the core by name.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules
from jaxdiff.samplers import SAMPLERS, get_sampler

# diffusers scheduler class -> jaxdiff sampler name (the same update rule, step for step)
SAMPLER_OF_SCHEDULER: dict[str, str] = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
}
# jaxdiff sampler -> the diffusers scheduler whose timesteps it uses by default
SCHEDULER_OF_SAMPLER: dict[str, str] = {v: k for k, v in SAMPLER_OF_SCHEDULER.items()}
SCHEDULER_OF_SAMPLER["dpmpp_2m_sde"] = "DPMSolverMultistepScheduler"
# diffusers schedulers jaxdiff does not implement -> (jaxdiff sampler, diffusers class whose noise levels are theirs)
SUBSTITUTE_OF_SCHEDULER: dict[str, tuple[str, str]] = {
    "PNDMScheduler": ("dpmpp_2m", "DDIMScheduler"),
    "LMSDiscreteScheduler": ("dpmpp_2m", "EulerDiscreteScheduler"),
}
"""Documented stand-ins, used without a warning.

``PNDMScheduler`` (Stable Diffusion 1.x folders; with ``skip_prk_steps`` it runs PLMS, a 4th-order linear
multistep on the noise estimate, Liu et al. 2022) -> DPM-Solver++ 2M (Lu et al. 2022), a multistep
solver of the same probability-flow ODE, on PNDM's own noise levels: the timesteps
``(n - 1 - i) * (T // n) + steps_offset`` of its spacing (``leading`` when the config does not say)
without PLMS's repeated warm-up timestep, ending at ``alphas_cumprod[0]`` unless ``set_alpha_to_one``,
from ``N(0, I)`` noise in VP coordinates: the levels DDIMScheduler computes from the same config.
``LMSDiscreteScheduler`` (k-diffusion's ``lms``, order 4) -> DPM-Solver++ 2M on LMS's sigmas, which are
EulerDiscreteScheduler's (fractional ``linspace`` timesteps by default, final level 0).
Neither clips x0 (those classes have no ``clip_sample``). Pass ``sampler=`` to choose another sampler.
"""
# each diffusers class's own default spacing (used when the folder's config does not say)
DEFAULT_SPACING = {"DDIMScheduler": "leading", "DDPMScheduler": "leading", "PNDMScheduler": "leading",
                   "LMSDiscreteScheduler": "linspace"}
FALLBACK_SAMPLER = "dpmpp_2m"
_WARNED: set[str] = set()  # scheduler classes already warned about in this process
SCHEDULE_NAMES = ("default", "karras", "exponential", "leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class TrainingSchedule:
    """What a scheduler config says about training: ``alphas_cumprod`` (T,) and the prediction type."""

    alphas_cumprod: np.ndarray
    prediction: str
    class_name: str
    config: Mapping[str, Any]

    @property
    def sigmas(self) -> np.ndarray:
        return schedules.vp_sigmas(self.alphas_cumprod)


def training_schedule(config: Mapping[str, Any]) -> TrainingSchedule:
    """``alphas_cumprod`` and prediction type of a diffusers scheduler config (defaults: diffusers')."""
    trained = config.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, np.float32)
    else:
        betas = schedules.vp_betas(config.get("beta_schedule", "linear"), int(config.get("num_train_timesteps", 1000)),
                                   float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02)))
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("rescale_betas_zero_snr schedulers are not supported yet (the final level is sigma = inf); "
                         "set rescale_betas_zero_snr to false in scheduler_config.json to sample anyway")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {prediction!r} in the scheduler config; "
                         "valid: epsilon, v_prediction, sample")
    name = str(config.get("_class_name", ""))
    return TrainingSchedule(schedules.alphas_cumprod(betas), prediction, name, dict(config))


def default_sampler(config: Mapping[str, Any]) -> str:
    """jaxdiff's equivalent of the folder's scheduler: the same rule (:data:`SAMPLER_OF_SCHEDULER`), the documented
    stand-in (:data:`SUBSTITUTE_OF_SCHEDULER`: PNDM, LMS), else DPM-Solver++ 2M."""
    name = str(config.get("_class_name", ""))
    if name == "DPMSolverMultistepScheduler" and config.get("algorithm_type", "dpmsolver++") == "sde-dpmsolver++":
        return "dpmpp_2m_sde"
    if name == "DPMSolverMultistepScheduler" and config.get("algorithm_type", "dpmsolver++") != "dpmsolver++":
        return FALLBACK_SAMPLER
    if name in SUBSTITUTE_OF_SCHEDULER:
        return SUBSTITUTE_OF_SCHEDULER[name][0]
    return SAMPLER_OF_SCHEDULER.get(name, FALLBACK_SAMPLER)


def _warn_substitution(class_name: str, sampler: str) -> None:
    """One warning per scheduler class and process (the CLI prints it as one line)."""
    if class_name in _WARNED:
        return
    _WARNED.add(class_name)
    warnings.warn(f"{class_name} has no jaxdiff equivalent; sampling with {sampler} instead "
                  "(choose one with sampler=... / --sampler)", stacklevel=4)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sampler, its noise levels, the standard deviation of the initial noise, and how t is read."""

    sampler: Any
    sigmas: schedules.Sigmas
    init_sigma: float
    quantize: bool  # the network sees integer timesteps (diffusers' integer schedules)
    sampler_name: str
    schedule_name: str
    # The x0 clipping of the scheduler config (clip_sample / thresholding) as a jaxdiff.guidance transform for the
    # pipeline to wrap the denoiser with (None: none). For DDIM and DDPM it is None: :func:`plan` puts the clip
    # into the sampler's own ``threshold`` field instead, where it acts inside the step as diffusers' does.
    threshold: Any = None


def plan(train: TrainingSchedule, steps: int, sampler: str | None = None, schedule: str | None = None, *,
         capacity: int = schedules.DEFAULT_CAPACITY, **sampler_options: Any) -> Plan:
    """Sampler and schedule for ``steps`` steps.

    ``schedule="default"`` (or None) reproduces the timesteps of the diffusers scheduler equivalent to the
    sampler, with the folder's ``timestep_spacing`` and ``steps_offset`` (as ``Scheduler.from_config`` does);
    ``"leading"``, ``"trailing"``, ``"linspace"`` force a spacing; ``"karras"`` and ``"exponential"`` span the
    training sigmas (Karras et al. 2022, eq. 5, rho = 7; the network reads fractional timesteps there).
    """
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"the number of steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    if steps > capacity:
        raise ValueError(f"{steps} steps exceed the schedule capacity {capacity}; pass a larger capacity")
    name = sampler or default_sampler(train.config)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(sorted(SAMPLERS))}")
    schedule = schedule or "default"
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULE_NAMES)}")
    substitute = SUBSTITUTE_OF_SCHEDULER.get(train.class_name) if sampler is None else None
    if (sampler is None and substitute is None and train.class_name not in SAMPLER_OF_SCHEDULER
            and train.class_name):
        _warn_substitution(train.class_name, name)
    ref = substitute[1] if substitute else SCHEDULER_OF_SAMPLER.get(name, "EulerDiscreteScheduler")
    cfg = train.config
    spacing = cfg.get("timestep_spacing") or DEFAULT_SPACING.get(train.class_name if substitute else ref, "linspace")
    if schedule in schedules.TIMESTEP_SPACINGS:
        spacing = schedule
    offset = int(cfg.get("steps_offset", 0))
    sig_train = train.sigmas
    if schedule in ("karras", "exponential"):
        lo, hi = float(sig_train[0]), float(sig_train[-1])
        make = schedules.karras if schedule == "karras" else schedules.exponential
        sigmas = make(steps, lo, hi, capacity=capacity)
        quantize = False
    else:
        sigmas = schedules.reference_schedule(ref, steps, train.alphas_cumprod, spacing, offset,
                                              set_alpha_to_one=bool(cfg.get("set_alpha_to_one", False)),
                                              capacity=capacity)
        quantize = schedules.REFERENCE_SCHEDULERS[ref][0] or spacing != "linspace"
    init = schedules.reference_init_sigma(ref, spacing, float(np.asarray(sigmas.values)[0]))
    if name == "ddpm" and "variance" not in sampler_options and owner_class(train, substitute, ref) == "DDPMScheduler":
        sampler_options = {**sampler_options, "variance": ddpm_variance(cfg)}
    obj = get_sampler(name, **sampler_options)
    owner = owner_class(train, substitute, ref)
    threshold = threshold_transform(owner, cfg)
    if owner in STEP_THRESHOLD_SCHEDULERS and hasattr(obj, "threshold"):
        if obj.threshold is None:  # a threshold passed in sampler_options wins over the config's
            obj = dataclasses.replace(obj, threshold=threshold)
        threshold = None
    return Plan(obj, schedules.Sigmas(jnp.asarray(sigmas.values, jnp.float32), jnp.asarray(sigmas.count, jnp.int32)),
                init, quantize, name, schedule, threshold)


def owner_class(train: TrainingSchedule, substitute: Any, ref: str) -> str:
    """The diffusers class whose config keys apply to the planned sampler."""
    return train.class_name if substitute else ref


# DDPMScheduler variance_type -> jaxdiff DDPM variance (the *_log forms draw the same noise)
DDPM_VARIANCE_OF_TYPE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                         "fixed_large_log": "fixed_large", "learned_range": "learned_range"}


def ddpm_variance(config: Mapping[str, Any]) -> str:
    """:class:`jaxdiff.samplers.DDPM`'s ``variance`` for a ``DDPMScheduler`` / ``UnCLIPScheduler`` config."""
    kind = str(config.get("variance_type", "fixed_small"))
    if kind not in DDPM_VARIANCE_OF_TYPE:
        raise ValueError(f"DDPM variance_type {kind!r} is not supported; supported: {', '.join(DDPM_VARIANCE_OF_TYPE)}")
    return DDPM_VARIANCE_OF_TYPE[kind]


# diffusers schedulers whose step() reads the config key thresholding (dynamic thresholding of x0)
THRESHOLDING_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
# those that read clip_sample, with their class default (from_config fills a missing key with it)
CLIP_SAMPLE_DEFAULT = {"DDIMScheduler": True, "DDPMScheduler": True, "HeunDiscreteScheduler": False}
# those whose jaxdiff sampler takes the clip as its own ``threshold`` field (diffusers' DDIM keeps the model's eps)
STEP_THRESHOLD_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")


def threshold_transform(scheduler: str, config: Mapping[str, Any]) -> Any:
    """The x0 clipping the scheduler config asks for when read by diffusers' ``scheduler`` class, as a
    :mod:`jaxdiff.guidance` transform (None: none).

    ``thresholding`` -> Imagen's dynamic thresholding (``dynamic_thresholding_ratio``, ``sample_max_value``)
    for the classes that read it (:data:`THRESHOLDING_SCHEDULERS`); else ``clip_sample`` for the classes
    that read it (:data:`CLIP_SAMPLE_DEFAULT`, with their defaults: True for DDIM and DDPM, False for Heun)
    -> a static clip to ``clip_sample_range``. Euler and Euler ancestral read neither key. Wrapping the
    denoiser with the transform reproduces DPM-Solver++, UniPC and Heun (they step with the clipped data
    estimate) and DDPM; DDIM must keep the network's own noise estimate, which is why :func:`plan` hands
    it to the ``threshold`` field of :class:`jaxdiff.samplers.DDIM` / ``DDPM`` instead.
    """
    from jaxdiff import guidance

    if scheduler in THRESHOLDING_SCHEDULERS and config.get("thresholding", False):
        return guidance.dynamic_threshold(config.get("dynamic_thresholding_ratio", 0.995),
                                          config.get("sample_max_value", 1.0))
    if scheduler in CLIP_SAMPLE_DEFAULT and config.get("clip_sample", CLIP_SAMPLE_DEFAULT[scheduler]):
        r = float(config.get("clip_sample_range", 1.0))
        return guidance.static_threshold(-r, r)
    return None


SCHEDULER_CONFIG = "scheduler_config.json"


def read_scheduler_config(path: str | Path) -> dict[str, Any]:
    """The config dict of a standalone scheduler: a ``scheduler_config.json`` file, a folder holding one (what
    diffusers' ``scheduler.save_pretrained(folder)`` writes), or a pipeline folder with a ``scheduler/`` one."""
    path = Path(path)
    if path.is_dir():
        candidates = (path / SCHEDULER_CONFIG, path / "scheduler" / SCHEDULER_CONFIG)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path} has no {SCHEDULER_CONFIG} (nor scheduler/{SCHEDULER_CONFIG}); "
                                    "save one with diffusers' scheduler.save_pretrained(folder)")
        path = found
    elif not path.is_file():
        raise FileNotFoundError(f"scheduler config {path} does not exist; give a {SCHEDULER_CONFIG} or its folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected a diffusers {SCHEDULER_CONFIG}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not a diffusers scheduler config object")
    return config


def unclip_as_ddpm(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``DDPMScheduler`` config equivalent to an ``UnCLIPScheduler`` config (others are returned as they are):
    ``linspace`` spacing (``round(i (T-1) / (n-1))``), squaredcos_cap_v2 betas, its variance, prediction and
    x0 clipping (``clip_sample`` defaults to True, as both classes do)."""
    if config.get("_class_name") != "UnCLIPScheduler":
        return dict(config)
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
            "beta_schedule": config.get("beta_schedule", "squaredcos_cap_v2"),
            "variance_type": config.get("variance_type", "fixed_small_log"),
            "prediction_type": config.get("prediction_type", "epsilon"),
            "clip_sample": bool(config.get("clip_sample", True)),
            "clip_sample_range": float(config.get("clip_sample_range", 1.0)), "timestep_spacing": "linspace"}


def load_scheduler(path: str | Path, steps: int, sampler: str | None = None, schedule: str | None = None,
                   **plan_options: Any) -> tuple[TrainingSchedule, Plan]:
    """A standalone diffusers scheduler (``scheduler_config.json``, see :func:`read_scheduler_config`) as jaxdiff's
    training schedule (``alphas_cumprod`` and prediction type, for :class:`jaxdiff.denoisers.DiscreteVPDenoiser`)
    and :class:`Plan` for ``steps`` steps (:func:`plan`: by default the folder's own scheduler, timesteps and
    initial sigma reproduced as ``SchedulerClass.from_pretrained(folder)`` followed by ``set_timesteps(steps)``).

    An ``UnCLIPScheduler`` is the ``DDPMScheduler`` of :func:`unclip_as_ddpm`. A class that is no diffusers
    scheduler (the name must end in ``Scheduler``) is an error; a diffusers scheduler
    jaxdiff does not implement is sampled by its documented stand-in or DPM-Solver++ 2M, with a warning.
    """
    config = unclip_as_ddpm(read_scheduler_config(path))
    name = config.get("_class_name")
    if name is None and sampler is None:
        raise ValueError(f"the scheduler config {path} has no _class_name; pass sampler= "
                         f"(one of {', '.join(sorted(SAMPLERS))})")
    if name is not None and (not isinstance(name, str) or not name.endswith("Scheduler")):
        known = sorted(set(SAMPLER_OF_SCHEDULER) | set(SUBSTITUTE_OF_SCHEDULER))
        raise ValueError(f"unknown scheduler class {name!r} in {path}; expected a diffusers scheduler such as "
                         f"{', '.join(known)}")
    train = training_schedule(config)
    return train, plan(train, steps, sampler, schedule, **plan_options)


def img2img_start(steps: int, strength: float) -> int:
    """First step of an image-to-image run, as diffusers' ``get_timesteps``: ``n - min(int(n s), n)``."""
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (the fraction of the steps to run), got {strength}")
    run = min(int(steps * float(strength)), steps)
    if run < 1:
        raise ValueError(f"strength {strength} with {steps} steps runs no step (int(steps * strength) = 0); "
                         f"raise the strength to at least {1.0 / steps:g} or the number of steps")
    return steps - run
