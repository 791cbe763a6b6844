"""Shared by the hippocampus benchmarks: nnU-Net folders in WORKDIR, and the Posterior-only foundation.

Foundation: stock nnU-Net, tiny preset, 1,000 iterations (nnUNetTrainer_20x50) on split 'B' of
hippocampus_split.json with Posterior labels only; its validation uses 5 cases of split 'A'. The 50 'query'
cases never enter any training.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "shared" / "data" / "hippocampus" / "Dataset004_Hippocampus"
SPLIT = json.loads((HERE / "hippocampus_split.json").read_text())
FOUNDATION_TRAINER = "nnUNetTrainer_20x50"


def setup_env(work: Path) -> None:
    """nnU-Net's folders in WORKDIR; the plugin's and the benchmarks' trainers on nnUNet_extTrainer."""
    if not SOURCE.is_dir():
        sys.exit(f"{SOURCE} not found: the hippocampus benchmarks need ../shared/data (see its README)")
    for d in ("raw", "pre", "res"):
        (work / d).mkdir(parents=True, exist_ok=True)
    from nnunetv2_fseft.cli.ext_path import trainers_folder
    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
                      nnUNet_results=str(work / "res"), nnUNet_compile="0", nnUNet_def_n_proc="1",
                      nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "2"),  # nnU-Net would start 12 on 2 cores
                      OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                      nnUNet_extTrainer=os.pathsep.join([trainers_folder(), str(HERE / "ext")]))


def run(cmd, log: Path) -> float:
    t = time.time()
    with open(log, "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)} (see {log})")
    return time.time() - t


def posterior_foundation(work: Path) -> Path:
    """The foundation's model folder, trained on the first call."""
    from nnunetv2_fseft.data.convert import relabel_dataset
    from nnunetv2_fseft.planning import plan_with_preset
    folder = work / "res" / "Dataset104_HippoPosterior" / f"{FOUNDATION_TRAINER}__nnUNetPlans__3d_fullres"
    if (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return folder
    relabel_dataset(SOURCE, 104, "HippoPosterior", {"posterior": ["Posterior"]}, overwrite=True)
    plan_with_preset(104, "tiny", overwrite=True)
    splits = [{"train": SPLIT["B"], "val": SPLIT["A"][:5]}]  # validation never touches the query
    (work / "pre" / "Dataset104_HippoPosterior" / "splits_final.json").write_text(json.dumps(splits))
    t = run([str(Path(sys.executable).parent / "nnUNetv2_train"), "104", "3d_fullres", "0", "-tr",
             FOUNDATION_TRAINER, "-device", "cpu"], work / "log.txt")
    print(f"foundation trained in {t:.0f} s", flush=True)
    return folder
