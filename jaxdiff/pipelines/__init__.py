"""Pipelines: short recipes composing tokenizers, networks, denoisers, guidance, samplers and autoencoders."""
from jaxdiff.pipelines.inpaint import MaskBlend as MaskBlend
from jaxdiff.pipelines.inpaint import mask_blend as mask_blend
from jaxdiff.pipelines.schedulers import Plan as Plan
from jaxdiff.pipelines.schedulers import TrainingSchedule as TrainingSchedule
from jaxdiff.pipelines.schedulers import plan as plan
from jaxdiff.pipelines.schedulers import training_schedule as training_schedule
from jaxdiff.pipelines.stable_diffusion import Request as Request
from jaxdiff.pipelines.stable_diffusion import SDModels as SDModels
from jaxdiff.pipelines.stable_diffusion import StableDiffusion as StableDiffusion
from jaxdiff.pipelines.stable_diffusion import UNetNet as UNetNet
from jaxdiff.pipelines.stable_diffusion import generate as generate
from jaxdiff.pipelines.stable_diffusion import generate_jit as generate_jit
from jaxdiff.pipelines.stable_diffusion import load as load
from jaxdiff.pipelines.dit import DiTPipeline as DiTPipeline
from jaxdiff.pipelines.unclip import UnCLIP as UnCLIP
