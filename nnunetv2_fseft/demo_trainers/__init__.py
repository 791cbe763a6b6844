"""Short-schedule trainers for nnUNetv2_fseft_demo (a folder the demo adds to nnUNet_extTrainer).

nnU-Net imports the modules of this folder under top-level names; the package itself is never imported by it."""
from pathlib import Path

FOLDER = str(Path(__file__).resolve().parent)
