"""Short-schedule trainers for nnUNetv2_fseft_demo: this folder is added to nnUNet_extTrainer by the demo.

nnU-Net imports the modules of this folder under top-level names (fseft_demo_trainers); this __init__ only holds
the schedules, so that the demo can read them without importing torch."""
from pathlib import Path

FOLDER = str(Path(__file__).resolve().parent)

# schedule -> {"pretrain"|"adapt": (epochs, iterations per epoch, validation iterations per epoch)}
SCHEDULES = {
    "demo": {"pretrain": (20, 40, 2), "adapt": (2, 40, 1)},
    "demoquick": {"pretrain": (6, 20, 1), "adapt": (2, 10, 1)},
}
PRETRAIN_LR = 1e-2  # nnU-Net's SGD default: MultiTalent's 1e-3 suits thousands of epochs, not a few hundred steps
THREADS_VARIABLE = "FSEFT_DEMO_TORCH_THREADS"  # torch threads per training when the demo runs several at a time
