"""The hippocampus few-shot grid's CPU budget (issue 4), found via nnUNet_extTrainer like benchmark_trainers.py.

`<name>_hip`: every FSEFT trainer, its TI variant and the from-scratch baseline at HIP_EPOCHS x 50 iterations, each
method at its own learning rate, everything else (augmentation, mirroring, inference) nnU-Net's. Why 250: the full
grid (2 protocols x methods x K x 3 seeds) at the default 1,000 iterations is days of 2 CPU cores. On the
shifted-domain protocol the supports' loss of the linear probe, LoRA and full FT had levelled off by 250 (decoder +
LoRA at K=1 was still falling); from scratch learns nothing yet (docs/hippocampus.md).
"""
from nnunetv2_fseft.training import fseft_ti_trainers, fseft_trainers

HIP_EPOCHS = 5  # 250 iterations
_SCHEDULE = {"epochs": HIP_EPOCHS, "iterations_per_epoch": 50, "val_iterations_per_epoch": 10}

for _module in (fseft_trainers, fseft_ti_trainers):
    for _name in [n for n in _module.__all__ if n.startswith("FSEFT")]:
        globals()[_name + "_hip"] = type(_name + "_hip", (getattr(_module, _name),), dict(_SCHEDULE))
