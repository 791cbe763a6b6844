"""The abdominal benchmark's schedules (issue 8), found via nnUNet_extTrainer like benchmark_trainers.py.

Pre-training (experiment 1, and the foundation of experiments 2-3): PRETRAIN_EPOCHS x 50 iterations for all three
models (MultiTalent, naive merge, upper bound), SGD 1e-2, as the hippocampus partial-label benchmark.
Adaptation (experiments 2-3): every FSEFT trainer, its TI variant and the from-scratch baseline as `<name>_abd`,
ADAPT_EPOCHS x 50 iterations, each method at its own learning rate; `<name>_abdlong` runs LONG_ADAPT_EPOCHS.
docs/abdomen.md says why these budgets.

No mirroring, in augmentation or at inference (nnU-Net's nnUNetTrainerNoMirroring): left and right kidneys and
adrenal glands are separate classes, told apart by their side, which a mirror swaps; and test-time mirroring costs
8 forward passes per tile, which made one query case take over 2 minutes on 2 CPU cores (measured).
"""
import os
import random

import numpy as np
import torch

from nnunetv2_fseft.training.multitalent import MultiTalentTrainer
from nnunetv2_fseft_trainers import fseft_ti_trainers, fseft_trainers

PRETRAIN_EPOCHS = 40   # 2,000 iterations
ADAPT_EPOCHS = 5       # 250 iterations
LONG_ADAPT_EPOCHS = 20 # 1,000 iterations (`<name>_abdlong`): a new head on a novel organ was still learning
                       # at 250 (its training loss still falling; docs/abdomen.md)
ITERATIONS, VAL_ITERATIONS = 50, 10


class NoMirroring:
    """nnUNetTrainerNoMirroring's override, as a mixin in front of any trainer."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class Seeded:
    """Seeds Python, NumPy and torch from nnUNet_fseft_seed before nnU-Net builds the network and data loaders. With
    nnUNet_n_proc_DA=0 (augmentation in the training process) a run then repeats itself on one machine, so a lost
    work folder rebuilds the same foundation and later sittings can add cells to its grid. FSEFTTrainer seeds only
    torch from the same variable: its adaptation cells augment in worker processes, which no seed here reaches."""

    def initialize(self):
        seed = os.environ.get("nnUNet_fseft_seed")
        if seed:
            random.seed(int(seed))
            np.random.seed(int(seed))
            torch.manual_seed(int(seed))
        super().initialize()


class nnUNetTrainer_abd(Seeded, NoMirroring, fseft_trainers.FSEFTScratchTrainer):
    """Stock nnU-Net pre-training (naive merge and upper bound) on the abdominal budget."""
    epochs, iterations_per_epoch, val_iterations_per_epoch = PRETRAIN_EPOCHS, ITERATIONS, VAL_ITERATIONS


class MultiTalentTrainer_abd(Seeded, NoMirroring, MultiTalentTrainer):
    """MultiTalent's loss and sampling on the same budget and SGD learning rate as nnUNetTrainer_abd, so that the
    three pre-training models differ in nothing else."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = PRETRAIN_EPOCHS
        self.num_iterations_per_epoch = ITERATIONS
        self.num_val_iterations_per_epoch = VAL_ITERATIONS
        self.initial_lr = 1e-2


for _suffix, _epochs in (("_abd", ADAPT_EPOCHS), ("_abdlong", LONG_ADAPT_EPOCHS)):
    _schedule = {"epochs": _epochs, "iterations_per_epoch": ITERATIONS, "val_iterations_per_epoch": VAL_ITERATIONS}
    for _module in (fseft_trainers, fseft_ti_trainers):
        for _name in [n for n in dir(_module) if n.startswith("FSEFT") and n.endswith("Trainer")]:
            globals()[_name + _suffix] = type(_name + _suffix, (NoMirroring, getattr(_module, _name)), dict(_schedule))
