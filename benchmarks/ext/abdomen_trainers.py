"""The abdominal benchmark's schedules (issue 8), found via nnUNet_extTrainer like benchmark_trainers.py.

Pre-training (experiment 1, and the foundation of experiments 2-3): PRETRAIN_EPOCHS x 50 iterations for all three
models (MultiTalent, naive merge, upper bound), SGD 1e-2, as the hippocampus partial-label benchmark.
Adaptation (experiments 2-3): every FSEFT trainer, its TI variant and the from-scratch baseline as `<name>_abd`,
ADAPT_EPOCHS x 50 iterations, each method at its own learning rate; `<name>_abdlong` runs LONG_ADAPT_EPOCHS.
docs/abdomen.md says why these budgets.

No mirroring, in augmentation or at inference (the plugin's NoMirroring, nnU-Net's nnUNetTrainerNoMirroring as a
mixin): left and right kidneys and adrenal glands are separate classes, told apart by their side, which a mirror
swaps; and test-time mirroring costs 8 forward passes per tile, which made one query case take over 2 minutes on 2
CPU cores (measured). Every plugin trainer seeds Python, NumPy and torch from nnUNet_fseft_seed before nnU-Net builds
the network and data loaders; with nnUNet_n_proc_DA=0 (augmentation in the training process) a pre-training then
repeats itself on one machine, so a lost work folder rebuilds the same foundation and later sittings can add cells
to its grid (abdomen.PRETRAIN_ENV). The adaptation cells augment in worker processes, which no seed reaches.
"""
from nnunetv2_fseft.training import fseft_ti_trainers, fseft_trainers
from nnunetv2_fseft.training.multitalent import MultiTalentTrainer
from nnunetv2_fseft.training.schedule import NoMirroring

PRETRAIN_EPOCHS = 40   # 2,000 iterations
ADAPT_EPOCHS = 5       # 250 iterations
LONG_ADAPT_EPOCHS = 20 # 1,000 iterations (`<name>_abdlong`): a new head on a novel organ was still learning
                       # at 250 (its training loss still falling; docs/abdomen.md)
ITERATIONS, VAL_ITERATIONS = 50, 10


class nnUNetTrainer_abd(NoMirroring, fseft_trainers.FSEFTScratchTrainer):
    """Stock nnU-Net pre-training (naive merge and upper bound) on the abdominal budget."""
    epochs, iterations_per_epoch, val_iterations_per_epoch = PRETRAIN_EPOCHS, ITERATIONS, VAL_ITERATIONS


class MultiTalentTrainer_abd(NoMirroring, MultiTalentTrainer):
    """MultiTalent's loss and sampling on the same budget and SGD learning rate as nnUNetTrainer_abd, so that the
    three pre-training models differ in nothing else."""
    epochs, iterations_per_epoch, val_iterations_per_epoch = PRETRAIN_EPOCHS, ITERATIONS, VAL_ITERATIONS
    learning_rate = 1e-2


for _suffix, _epochs in (("_abd", ADAPT_EPOCHS), ("_abdlong", LONG_ADAPT_EPOCHS)):
    _schedule = {"epochs": _epochs, "iterations_per_epoch": ITERATIONS, "val_iterations_per_epoch": VAL_ITERATIONS}
    for _module in (fseft_trainers, fseft_ti_trainers):
        for _name in [n for n in _module.__all__ if n.startswith("FSEFT")]:
            globals()[_name + _suffix] = type(_name + _suffix, (NoMirroring, getattr(_module, _name)), dict(_schedule))
