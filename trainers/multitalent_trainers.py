"""MultiTalent-style partial-label pre-training, for `nnUNetv2_train ... -tr NAME` with nnUNet_extTrainer set.

nnU-Net imports this file under a top-level name, hence absolute imports only."""
from nnunetv2_fseft.training.multitalent import MultiTalentTrainer  # noqa: F401
