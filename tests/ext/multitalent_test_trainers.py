"""MultiTalent on a test budget (nnUNet_extTrainer=$(nnUNetv2_fseft_ext_path):tests/ext); not shipped."""
from nnunetv2_fseft.training.multitalent import MultiTalentTrainer
from nnunetv2_fseft.training.schedule import NoMirroring


class MultiTalentTrainer_tiny(NoMirroring, MultiTalentTrainer):
    """200 iterations at nnU-Net's learning rate (1e-2), enough for a tiny network to find every organ of small
    phantoms; not a schedule to pre-train a real foundation model with. No mirroring: phantom organs are told apart
    by where they are, which mirroring swaps."""
    learning_rate = 1e-2
    epochs, iterations_per_epoch, val_iterations_per_epoch = 10, 20, 1
