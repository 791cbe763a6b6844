"""Demo schedules: each trainer of the story with a few hundred iterations instead of thousands.

nnUNetv2_fseft_demo puts this folder on nnUNet_extTrainer; nnU-Net imports this file under a top-level name, hence
absolute imports only. Names are '<trainer>_<schedule>', e.g. FSEFTLoRATrainer_demo, MultiTalentTrainer_demoquick,
nnUNetTrainer_demo (stock nnU-Net, the from-scratch baseline). Besides the schedule, two things differ from the
trainers they extend, for the demo's run time only:
- adaptation runs skip nnU-Net's final validation: its val set is the query set, which the demo predicts with
  nnUNetv2_predict and scores with nnU-Net's evaluation right afterwards (the foundation keeps its validation);
- no mirroring (augmentation and test-time), as nnU-Net's nnUNetTrainerNoMirroring: phantom organs, like left and
  right kidneys, are told apart by where they are, which mirroring swaps;
- FSEFT_DEMO_TORCH_THREADS, if set, replaces the thread count nnUNetv2_train -device cpu sets (all cores), so that
  the demo can run several trainings side by side without oversubscribing the CPU;
- nnUNet_fseft_seed, which the demo sets, seeds Python's, NumPy's and torch's generators before the network is
  built (as every plugin trainer does, training/schedule.py), so that the initialisation, the case sampling and the
  augmentation (in-process with nnUNet_n_proc_DA=0) repeat.
These schedules make a phantom story run in minutes on a CPU; they are not schedules for real data.
"""
import os

import torch

from nnunetv2_fseft.demo_trainers import PRETRAIN_LR, SCHEDULES, THREADS_VARIABLE
from nnunetv2_fseft.training import fseft_trainers
from nnunetv2_fseft.training.multitalent import MultiTalentTrainer
from nnunetv2_fseft.training.schedule import NoMirroring


class _DemoThreads:
    """FSEFT_DEMO_TORCH_THREADS replaces the thread count nnUNetv2_train -device cpu has set (all cores)."""

    def initialize(self):
        threads = os.environ.get(THREADS_VARIABLE)
        if threads and threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        super().initialize()


def _skip_final_validation(self, save_probabilities: bool = False):
    self.print_to_log_file("nnUNetv2_fseft_demo: final validation skipped; the demo predicts the query cases "
                           "(this fold's val set) with nnUNetv2_predict and scores them with nnU-Net's evaluation")


def _declare(name: str, base, times: tuple, **attrs) -> None:
    """`name`: `base` on the schedule `times` (class attributes, training/schedule.py), without mirroring."""
    epochs, iterations, val_iterations = times
    globals()[name] = type(name, (_DemoThreads, NoMirroring, base), dict(
        attrs, epochs=epochs, iterations_per_epoch=iterations, val_iterations_per_epoch=val_iterations,
        __module__=__name__))


def _define(schedule: str, times: dict) -> None:
    _declare(f"MultiTalentTrainer_{schedule}", MultiTalentTrainer, times["pretrain"], learning_rate=PRETRAIN_LR)
    # the from-scratch baseline: stock nnU-Net (SGD 1e-2, poly), as many iterations as the FSEFT methods
    _declare(f"nnUNetTrainer_{schedule}", fseft_trainers.FSEFTScratchTrainer, times["adapt"],
             perform_actual_validation=_skip_final_validation)
    for attr in fseft_trainers.__all__:
        _declare(f"{attr}_{schedule}", getattr(fseft_trainers, attr), times["adapt"],
                 perform_actual_validation=_skip_final_validation)


for _schedule, _times in SCHEDULES.items():
    _define(_schedule, _times)
