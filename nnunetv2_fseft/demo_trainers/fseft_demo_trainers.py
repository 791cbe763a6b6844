"""Demo schedules: each trainer of the story with a few hundred iterations instead of thousands.

nnUNetv2_fseft_demo puts this folder on nnUNet_extTrainer; nnU-Net imports this file under a top-level name, hence
absolute imports only. Names are '<trainer>_<schedule>', e.g. FSEFTLoRATrainer_demo, MultiTalentTrainer_demoquick,
nnUNetTrainer_demo (stock nnU-Net, the from-scratch baseline). Besides the schedule, two things differ from the
trainers they extend, both for the demo's run time only:
- adaptation runs skip nnU-Net's final validation: its val set is the query set, which the demo predicts with
  nnUNetv2_predict and scores with nnU-Net's evaluation right afterwards (the foundation keeps its validation);
- no mirroring (augmentation and test-time), as nnU-Net's nnUNetTrainerNoMirroring: phantom organs, like left and
  right kidneys, are told apart by where they are, which mirroring swaps;
- FSEFT_DEMO_TORCH_THREADS, if set, replaces the thread count nnUNetv2_train -device cpu sets (all cores), so that
  the demo can run several trainings side by side without oversubscribing the CPU;
- nnUNet_fseft_seed, if set, seeds Python's, NumPy's and torch's generators before the network is built, so that
  the initialisation, the case sampling and the augmentation (in-process with nnUNet_n_proc_DA=0) repeat.
These schedules make a phantom story run in minutes on a CPU; they are not schedules for real data.
"""
import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_fseft.demo_trainers import PRETRAIN_LR, SCHEDULES, THREADS_VARIABLE
from nnunetv2_fseft.training.multitalent import MultiTalentTrainer
from nnunetv2_fseft.training.schedule import without_mirroring
from nnunetv2_fseft_trainers import fseft_trainers

def _set_threads() -> None:
    threads = os.environ.get(THREADS_VARIABLE)
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def _seed() -> None:
    seed = os.environ.get("nnUNet_fseft_seed")
    if seed and seed.isdigit():
        random.seed(int(seed))
        np.random.seed(int(seed))
        torch.manual_seed(int(seed))


def _skip_final_validation(self, save_probabilities: bool = False):
    self.print_to_log_file("nnUNetv2_fseft_demo: final validation skipped; the demo predicts the query cases "
                           "(this fold's val set) with nnUNetv2_predict and scores them with nnU-Net's evaluation")


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
        _set_threads()
        _seed()  # nnU-Net builds the network later, in initialize()
    return __init__


def _define(schedule: str, times: dict) -> None:
    module = globals()
    epochs, iterations, val_iterations = times["pretrain"]
    name = f"MultiTalentTrainer_{schedule}"
    module[name] = type(name, (MultiTalentTrainer,), {
        "__init__": _schedule_init(MultiTalentTrainer, epochs, iterations, val_iterations, PRETRAIN_LR),
        "configure_rotation_dummyDA_mirroring_and_inital_patch_size": without_mirroring(MultiTalentTrainer),
        "__module__": __name__})

    epochs, iterations, val_iterations = times["adapt"]
    # the from-scratch baseline: stock nnU-Net (SGD 1e-2, poly), as many iterations as the FSEFT methods
    name = f"nnUNetTrainer_{schedule}"
    module[name] = type(name, (nnUNetTrainer,), {
        "__init__": _schedule_init(nnUNetTrainer, epochs, iterations, val_iterations),
        "configure_rotation_dummyDA_mirroring_and_inital_patch_size": without_mirroring(nnUNetTrainer),
        "perform_actual_validation": _skip_final_validation, "__module__": __name__})

    # the FSEFT trainers read their schedule from class attributes (set here too, for the log)
    for attr in dir(fseft_trainers):
        base = getattr(fseft_trainers, attr)
        if isinstance(base, type) and issubclass(base, nnUNetTrainer) and attr.startswith("FSEFT") \
                and attr.endswith("Trainer") and attr != "FSEFTTrainer":
            name = f"{attr}_{schedule}"
            module[name] = type(name, (base,), {
                "epochs": epochs, "iterations_per_epoch": iterations, "val_iterations_per_epoch": val_iterations,
                "__init__": _schedule_init(base, epochs, iterations, val_iterations),
                "configure_rotation_dummyDA_mirroring_and_inital_patch_size": without_mirroring(base),
                "perform_actual_validation": _skip_final_validation, "__module__": __name__})


for _schedule, _times in SCHEDULES.items():
    _define(_schedule, _times)
