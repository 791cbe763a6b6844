"""Short-schedule trainers for the tests (nnUNet_extTrainer=$(nnUNetv2_fseft_ext_path):tests/ext).

This is also how a user overrides a schedule: a tiny subclass in a folder of their own."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_fseft_trainers import fseft_trainers

SHORT = {"epochs": 1, "iterations_per_epoch": 3, "val_iterations_per_epoch": 1}


def _skip_final_validation(self, save_probabilities: bool = False):
    """In-process tests skip nnU-Net's final validation (the CLI test keeps it)."""


for _name in [n for n in dir(fseft_trainers) if n.startswith("FSEFT") and n.endswith("Trainer")]:
    _base = getattr(fseft_trainers, _name)
    globals()[f"{_name}_test"] = type(f"{_name}_test", (_base,), dict(SHORT))
    globals()[f"{_name}_testnoval"] = type(f"{_name}_testnoval", (_base,),
                                            dict(SHORT, perform_actual_validation=_skip_final_validation))


class nnUNetTrainer_fseft_pretrain(nnUNetTrainer):
    """A short stock pre-training: enough for plumbing, not for quality."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 1
