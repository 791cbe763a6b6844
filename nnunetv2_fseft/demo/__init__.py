"""The FSEFT story end to end, through nnU-Net's own machinery, in minutes on a CPU (nnUNetv2_fseft_demo).

    data -> assemble -> plan -> pretrain (MultiTalentTrainer) -> prepare target + K-shot folds
         -> adapt (FSEFT trainers, K = 1 and 5) -> nnUNetv2_predict the query cases -> nnU-Net's evaluation
         -> table (markdown) + plot of Dice vs K

The default data are synthetic CT-like phantoms (nnunetv2_fseft.synthetic): two partially labelled "public
datasets" (A: liver + spleen, B: liver + kidneys) make the foundation; the target comes from another "scanner"
(organ intensities shifted) and labels the liver (a class the foundation knows, in a new domain) and the
pancreas (a structure no foundation dataset annotates): the FSEFT study's two scenarios, reported per class. With `data=` the same
story runs on the user's own raw datasets.

Training and prediction run as nnU-Net's console scripts (nnUNetv2_train, nnUNetv2_predict) in subprocesses whose
environment points nnUNet_raw/_preprocessed/_results into the work dir; data assembly, planning, target
preparation, the few-shot splits and the evaluation call the plugin's and nnU-Net's Python functions. Every step
logs to <workdir>/logs/ and records its result in <workdir>/steps/, so a re-run skips finished steps.

Modules, each importing only those above it: settings (what a run does), workdir, steps (running and recording a
step), stages (data to query set), adapt (the adaptation runs), report, story (the order of it all).
"""
from .report import plot, results_table
from .story import run_demo
from .workdir import MARKER

__all__ = ["MARKER", "plot", "results_table", "run_demo"]
