"""Stock nnU-Net schedules used by the benchmarks (found via nnUNet_extTrainer)."""
from nnunetv2_fseft.training.fseft_trainers import FSEFTScratchTrainer
from nnunetv2_fseft.training.multitalent import MultiTalentTrainer


class nnUNetTrainer_20x50(FSEFTScratchTrainer):
    """1,000 iterations of stock nnU-Net: pre-training on CPU and the from-scratch baseline (the name the
    committed results use; the schedule is FSEFTScratchTrainer's)."""


class nnUNetTrainer_40x50(nnUNetTrainer_20x50):
    """2,000 iterations: the budget at which stock nnU-Net with the tiny plans reaches ~0.85 on hippocampus."""
    epochs = 40


class MultiTalentTrainer_20x50(MultiTalentTrainer):
    """MultiTalent's loss and sampling on the same 1,000-iteration budget and SGD learning rate (1e-2) as
    nnUNetTrainer_20x50, so that partial-label vs naive vs fully-labelled training differ in nothing else
    (MultiTalent's own 1e-3 suits its 1,000 epochs, not 1,000 iterations)."""
    epochs, iterations_per_epoch, val_iterations_per_epoch = 20, 50, 10
    learning_rate = 1e-2


class MultiTalentTrainer_40x50(MultiTalentTrainer_20x50):
    epochs = 40
