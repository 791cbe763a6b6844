"""Short-schedule trainers for the tests (nnUNet_extTrainer=$(nnUNetv2_fseft_ext_path):tests/ext).

This is also how a user overrides a schedule: a tiny subclass in a folder of their own."""
from nnunetv2_fseft.training import fseft_trainers
from nnunetv2_fseft.training.fseft_trainers import FSEFTScratchTrainer

SHORT = {"epochs": 1, "iterations_per_epoch": 3, "val_iterations_per_epoch": 1}


def _skip_final_validation(self, save_probabilities: bool = False):
    """In-process tests skip nnU-Net's final validation (the CLI test keeps it)."""


for _name in [n for n in fseft_trainers.__all__ if n.startswith("FSEFT")]:
    _base = getattr(fseft_trainers, _name)
    globals()[f"{_name}_test"] = type(f"{_name}_test", (_base,), dict(SHORT))
    globals()[f"{_name}_testnoval"] = type(f"{_name}_testnoval", (_base,),
                                            dict(SHORT, perform_actual_validation=_skip_final_validation))


class nnUNetTrainer_fseft_pretrain(FSEFTScratchTrainer):
    """A short stock pre-training: enough for plumbing, not for quality."""
    epochs, iterations_per_epoch, val_iterations_per_epoch = 2, 10, 1
