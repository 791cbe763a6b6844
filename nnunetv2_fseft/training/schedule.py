"""One idiom for every plugin trainer (FSEFT, the stock baselines, MultiTalent, and their demo, test and benchmark
variants): the schedule is class attributes (so an override is a tiny subclass, as with nnU-Net's own variants),
mapped here onto the fields nnUNetTrainer.__init__ sets; the seed comes from one environment variable, applied in
initialize(); and no mirroring is one mixin."""
import os
import random

import numpy as np
import torch

SEED_VARIABLE = "nnUNet_fseft_seed"


def apply_schedule(trainer) -> None:
    """After nnUNetTrainer.__init__: learning_rate, epochs, iterations_per_epoch, val_iterations_per_epoch."""
    trainer.initial_lr = trainer.learning_rate
    trainer.num_epochs = trainer.epochs
    trainer.num_iterations_per_epoch = trainer.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = trainer.val_iterations_per_epoch
    # so --c has something recent to resume from; never rarer than nnU-Net's own 50
    trainer.save_every = max(1, min(50, trainer.epochs // 4))


def seed_from_environment() -> None:
    """Python's, NumPy's and torch's generators from nnUNet_fseft_seed, if set. Called first in initialize(), before
    nnU-Net builds the network: the benchmark harness pairs methods on one initialisation of new heads and adapters,
    and with nnUNet_n_proc_DA=0 (augmentation in the training process) the case sampling and augmentation repeat
    too. Worker processes of nnU-Net's data augmentation are not reached."""
    seed = os.environ.get(SEED_VARIABLE)
    if seed and seed.isdigit():
        random.seed(int(seed))
        np.random.seed(int(seed))
        torch.manual_seed(int(seed))


class NoMirroring:
    """nnUNetTrainerNoMirroring's override as a mixin in front of any trainer: no mirroring in augmentation or at
    test time, for phantoms and abdomens whose left and right organs are told apart by side."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None
