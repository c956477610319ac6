"""jaxdiff: diffusion models as composable pure JAX functions.

The core imported here is Flax-free: denoiser adapters, schedules, samplers, the compiled runner,
guidance transforms and losses. Networks live in :mod:`jaxdiff.models` (Flax NNX), checkpoint
loading in :mod:`jaxdiff.convert`, training in :mod:`jaxdiff.train`, recipes in :mod:`jaxdiff.pipelines`.
"""
from jaxdiff import cpu_devices as cpu_devices
from jaxdiff import denoisers as denoisers
from jaxdiff import guidance as guidance
from jaxdiff import losses as losses
from jaxdiff import metrics as metrics
from jaxdiff import mixtures as mixtures
from jaxdiff import samplers as samplers
from jaxdiff import sampling as sampling
from jaxdiff import schedules as schedules
from jaxdiff.samplers import get_sampler as get_sampler
from jaxdiff.sampling import sample as sample
from jaxdiff.schedules import get_schedule as get_schedule

__version__ = "0.1.0"

cpu_devices.configure()  # one CPU device per core unless the user chose (see jaxdiff.cpu_devices); before any JAX work
