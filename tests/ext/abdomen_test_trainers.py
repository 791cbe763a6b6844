"""Short, mirror-free trainers for the abdominal benchmark's end-to-end test (tests/test_abdomen_synth.py): the
benchmark's own NoMirroring (left/right organs; one inference pass instead of eight) on a plumbing-only budget."""
import importlib.util
from pathlib import Path

from nnunetv2_fseft.training import fseft_trainers

# benchmarks/ext is not a package: load its module by path (nnU-Net imports ext folders under top-level names)
_spec = importlib.util.spec_from_file_location(
    "abdomen_trainers_for_tests", Path(__file__).resolve().parents[2] / "benchmarks" / "ext" / "abdomen_trainers.py")
_abd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_abd)


def _skip_final_validation(self, save_probabilities: bool = False):
    """A foundation's own validation is not needed by the harness."""


class nnUNetTrainer_abdtest(_abd.NoMirroring, fseft_trainers.FSEFTScratchTrainer):
    epochs, iterations_per_epoch, val_iterations_per_epoch = 2, 5, 1
    perform_actual_validation = _skip_final_validation


class nnUNetTrainer_abdseeded(nnUNetTrainer_abdtest):
    """The benchmark's seeded pre-training on the plumbing budget (every plugin trainer seeds from
    nnUNet_fseft_seed; the name keeps the test's meaning)."""


FSEFTLinearProbeTrainer_abdtest = type("FSEFTLinearProbeTrainer_abdtest",
                                       (_abd.NoMirroring, fseft_trainers.FSEFTLinearProbeTrainer),
                                       {"epochs": 1, "iterations_per_epoch": 3, "val_iterations_per_epoch": 1})
