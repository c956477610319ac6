"""jaxdiff: diffusion models as composable pure JAX functions.

The core imported here is Flax-free: denoiser adapters, schedules, samplers, the compiled runner,
guidance transforms and losses. Networks live in :mod:`jaxdiff.models` (Flax NNX), checkpoint
loading in :mod:`jaxdiff.convert`, training in :mod:`jaxdiff.train`, recipes in :mod:`jaxdiff.pipelines`.

Write your own denoisers, transforms and samplers as :func:`pytree_dataclass` classes (numeric
settings as fields, hashable options as :func:`static_field`): they are then traced, never baked
into the compiled program, and each class keeps its own tree structure, which JAX's own dataclass
registration does not guarantee (see :mod:`jaxdiff._pytree` for why that matters under ``jit``).
"""
from jaxdiff import conditioning as conditioning
from jaxdiff import cpu_devices as cpu_devices
from jaxdiff import denoisers as denoisers
from jaxdiff import guidance as guidance
from jaxdiff import losses as losses
from jaxdiff import metrics as metrics
from jaxdiff import mixtures as mixtures
from jaxdiff import samplers as samplers
from jaxdiff._pytree import pytree_dataclass as pytree_dataclass
from jaxdiff._pytree import static_field as static_field
from jaxdiff import sampling as sampling
from jaxdiff import schedules as schedules
from jaxdiff import video_guidance as video_guidance
from jaxdiff.samplers import get_sampler as get_sampler
from jaxdiff.sampling import sample as sample
from jaxdiff.schedules import get_schedule as get_schedule

__version__ = "0.1.0"

cpu_devices.configure()  # one CPU device per core unless the user chose (see jaxdiff.cpu_devices); before any JAX work
