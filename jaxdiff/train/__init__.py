"""Training: objectives, the jit-compiled step, EMA, checkpoints, data and the ``fit`` loop.

Typical use::

    objective = DiffusionObjective(losses.edm_loss(), EDMDenoiser(net=None))
    trainer, state = Trainer.create(model, objective, OptimizerConfig(1e-3), sample_shape=(8, 8, 1))
    state = fit(trainer, state, ArrayDataset(train, batch_size=64), 10_000, workdir="runs/digits")
    denoiser = trainer.denoiser(state)  # EMA weights inside the same adapter: ready for a sampler
"""
from jaxdiff.train.autoencoder import AutoencoderObjective as AutoencoderObjective
from jaxdiff.train.autoencoder import gaussian_kl as gaussian_kl
from jaxdiff.train.checkpoint import CheckpointError as CheckpointError
from jaxdiff.train.checkpoint import CheckpointMismatchError as CheckpointMismatchError
from jaxdiff.train.checkpoint import CheckpointStore as CheckpointStore
from jaxdiff.train.checkpoint import run_identity as run_identity
from jaxdiff.train.checkpoint import tree_checksum as tree_checksum
from jaxdiff.train.contrastive import ContrastiveObjective as ContrastiveObjective
from jaxdiff.train.contrastive import ContrastiveTrainer as ContrastiveTrainer
from jaxdiff.train.contrastive import clip_loss as clip_loss
from jaxdiff.train.data import ArrayDataset as ArrayDataset
from jaxdiff.train.data import load_digits_dataset as load_digits_dataset
from jaxdiff.train.ema import ema_update as ema_update
from jaxdiff.train.loop import MetricsLog as MetricsLog
from jaxdiff.train.loop import fit as fit
from jaxdiff.train.loop import fit_recorded as fit_recorded
from jaxdiff.train.loop import read_metrics as read_metrics
from jaxdiff.train.objectives import ClassifierObjective as ClassifierObjective
from jaxdiff.train.objectives import DiffusionObjective as DiffusionObjective
from jaxdiff.train.objectives import TextDiffusionObjective as TextDiffusionObjective
from jaxdiff.train.objectives import drop_context as drop_context
from jaxdiff.train.objectives import drop_labels as drop_labels
from jaxdiff.train.optim import OptimizerConfig as OptimizerConfig
from jaxdiff.train.optim import learning_rate_schedule as learning_rate_schedule
from jaxdiff.train.optim import make_optimizer as make_optimizer
from jaxdiff.train.step import Trainer as Trainer
from jaxdiff.train.step import TrainState as TrainState
from jaxdiff.train.step import network as network
