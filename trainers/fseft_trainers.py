"""The FSEFT trainers (declared in nnunetv2_fseft/training/fseft_trainers.py): each is a PEFT method and its learning
rate (AdamW), plus the stock nnU-Net baselines on the same schedule.

nnU-Net finds these through nnUNet_extTrainer=$(nnUNetv2_fseft_ext_path); it imports this module under a top-level
name, hence absolute imports only. Override a schedule with a tiny subclass in a folder of your own (README)."""
from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer  # noqa: F401 (the base of a user's subclass)
from nnunetv2_fseft.training.fseft_trainers import *  # noqa: F401,F403
