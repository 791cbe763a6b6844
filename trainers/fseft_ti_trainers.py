"""The transductive (TI) FSEFT trainers (declared in nnunetv2_fseft/training/fseft_ti_trainers.py): each FSEFT
trainer plus the organ-size prior on the unlabelled query set (docs/transductive.md).

nnU-Net finds these through nnUNet_extTrainer=$(nnUNetv2_fseft_ext_path) and imports this module under a top-level
name: absolute imports only. Change lambda, gamma or the warm-up with a subclass, e.g.

    class FSEFTLoRATITrainer_lambda1(FSEFTLoRATITrainer):
        ti_lambda, ti_warmup_epochs = 1.0, 5
"""
from nnunetv2_fseft.training.fseft_ti_trainers import *  # noqa: F401,F403
