"""Demo schedules: each trainer of the story with a few hundred iterations instead of thousands.

The demo puts this folder on nnUNet_extTrainer; nnU-Net imports this file under a top-level name, hence absolute
imports only. Names are '<trainer>_<schedule>', e.g. FSEFTLoRATrainer_demo, MultiTalentTrainer_demoquick.
These schedules make a phantom story run in minutes on a CPU; they are not schedules for real data.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_fseft.training.multitalent import MultiTalentTrainer
from nnunetv2_fseft_trainers import fseft_trainers

# schedule -> {"pretrain"|"adapt": (epochs, iterations per epoch, validation iterations per epoch)}
SCHEDULES = {
    "demo": {"pretrain": (30, 25, 2), "adapt": (10, 25, 2)},
    "demoquick": {"pretrain": (10, 15, 1), "adapt": (3, 10, 1)},
}
PRETRAIN_LR = 1e-2  # nnU-Net's default SGD rate: MultiTalent's 1e-3 is for thousands of epochs, not a few hundred steps


def _schedule_init(base, epochs, iterations, val_iterations, initial_lr=None):
    """An __init__ with nnU-Net's exact signature (nnU-Net reads it to fill the checkpoint's init_args)."""
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        self.num_iterations_per_epoch = iterations
        self.num_val_iterations_per_epoch = val_iterations
        if initial_lr is not None:
            self.initial_lr = initial_lr
    return __init__


def _define(schedule: str, times: dict) -> None:
    module = globals()
    epochs, iterations, val_iterations = times["pretrain"]
    for base, lr in ((MultiTalentTrainer, PRETRAIN_LR),):
        name = f"{base.__name__}_{schedule}"
        module[name] = type(name, (base,), {"__init__": _schedule_init(base, epochs, iterations, val_iterations, lr),
                                            "__module__": __name__})
    epochs, iterations, val_iterations = times["adapt"]
    # the from-scratch baseline: stock nnU-Net (SGD 1e-2, poly), same number of iterations as the FSEFT methods
    name = f"nnUNetTrainer_{schedule}"
    module[name] = type(name, (nnUNetTrainer,), {"__init__": _schedule_init(nnUNetTrainer, epochs, iterations,
                                                                             val_iterations),
                                                 "__module__": __name__})
    # the FSEFT trainers read their schedule from class attributes
    for attr in dir(fseft_trainers):
        base = getattr(fseft_trainers, attr)
        if isinstance(base, type) and attr.startswith("FSEFT") and attr.endswith("Trainer"):
            name = f"{attr}_{schedule}"
            module[name] = type(name, (base,), {"epochs": epochs, "iterations_per_epoch": iterations,
                                                "val_iterations_per_epoch": val_iterations, "__module__": __name__})


for _schedule, _times in SCHEDULES.items():
    _define(_schedule, _times)
