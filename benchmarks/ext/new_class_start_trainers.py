"""FSEFT trainers in two head starts:
  prior  as shipped: a new class's head channel starts at p = 0.01 (bias logit(0.01), weights zero)
  zero   as before: every fresh channel's bias at zero too, so a new class starts tied with background
<Trainer>_demo_<start>: the demo's trainers, with nnU-Net's final validation (the demo skips it).
FSEFTDecoderLoRATrainer_paired_<start>: the shipped trainer (which seeds Python/NumPy/torch from nnUNet_fseft_seed
before the network is built: with nnUNet_n_proc_DA=0 the two starts see the same batches), one torch thread; for
the hippocampus pair run by hand (benchmarks/results/new_class_start_NOTES.md).
Imported by nnU-Net under a top-level name: absolute imports only."""
import sys

import torch

from nnunetv2_fseft.demo_trainers import FOLDER
from nnunetv2_fseft.peft.tree import head_modules
from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer
from nnunetv2_fseft.training.fseft_trainers import FSEFTDecoderLoRATrainer

sys.path.insert(0, FOLDER)  # nnU-Net imports the demo trainers under this same top-level name
import fseft_demo_trainers  # noqa: E402

BASES = ("FSEFTDecoderLoRATrainer", "FSEFTFullFTTrainer")


def _zero_fresh_biases(self) -> None:
    """Fresh channels are those with all-zero weights in every head (background and new classes)."""
    with torch.no_grad():
        for head in head_modules(self.plain_network()):
            fresh = head.weight.flatten(1).abs().sum(1) == 0
            head.bias[fresh] = 0
    self.print_to_log_file("head start: fresh channels' bias set to zero (a new class tied with background)")


EPOCHS = 3  # x 40 iterations: the demo's adaptation schedule when this was measured (the demo now runs 2 x 40)


def _define(base_name: str, start: str) -> None:
    base = getattr(fseft_demo_trainers, f"{base_name}_demo")
    attrs = {"epochs": EPOCHS, "perform_actual_validation": FSEFTTrainer.perform_actual_validation,
             "__module__": __name__}
    if start == "zero":
        def on_train_start(self):
            base.on_train_start(self)
            _zero_fresh_biases(self)
        attrs["on_train_start"] = on_train_start
    name = f"{base_name}_demo_{start}"
    globals()[name] = type(name, (base,), attrs)


def _define_paired(start: str) -> None:
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        FSEFTDecoderLoRATrainer.__init__(self, plans, configuration, fold, dataset_json, device)
        torch.set_num_threads(1)  # nnUNetv2_train -device cpu has just set all cores; two cells run side by side

    def on_train_start(self):
        FSEFTDecoderLoRATrainer.on_train_start(self)
        torch.set_num_threads(1)
        if start == "zero":
            _zero_fresh_biases(self)
    name = f"FSEFTDecoderLoRATrainer_paired_{start}"
    globals()[name] = type(name, (FSEFTDecoderLoRATrainer,), {"__init__": __init__, "on_train_start": on_train_start,
                                                               "__module__": __name__})


for _start in ("prior", "zero"):
    for _base in BASES:
        _define(_base, _start)
    _define_paired(_start)
