"""Pseudo-labels from an adapted model: nnU-Net's own prediction (nnUNetv2_predict_from_modelfolder with
--save_probabilities) of the unlabelled scans, trusted where the winning class's probability reaches a threshold.
No torch here: the prediction runs as nnU-Net's command."""
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np

from ..errors import FSEFTError

# a voxel is trusted when its predicted class has at least this probability (set before any benchmark ran; not tuned)
CONFIDENCE = 0.9


def _command(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else name


def predict_probabilities(model_folder, fold, images: Dict[str, List[Path]], device: str, log) -> Dict[str, np.ndarray]:
    """case id -> class probabilities (C, *image array shape) from nnU-Net's predictor, with its test-time
    mirroring as nnUNetv2_predict does by default."""
    with tempfile.TemporaryDirectory(prefix="fseft_pseudo_") as tmp:
        tmp = Path(tmp)
        inputs = tmp / "in"
        inputs.mkdir()
        for case, files in images.items():
            for c, f in enumerate(files):
                ending = f.name[len(f"{case}_{c:04d}"):]
                (inputs / f"{case}_{c:04d}{ending}").symlink_to(Path(f).resolve())
        cmd = [_command("nnUNetv2_predict_from_modelfolder"), "-i", str(inputs), "-o", str(tmp / "out"),
               "-m", str(model_folder), "-f", str(fold), "--save_probabilities", "-npp", "1", "-nps", "1",
               "-device", device, "--disable_progress_bar"]
        log(f"predicting {len(images)} unlabelled scans with {model_folder} fold {fold}")
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode:
            last = [ln for ln in r.stdout.strip().splitlines() if ln.strip()][-1:] or ["no output"]
            raise FSEFTError(f"nnU-Net's prediction with {model_folder} failed ({last[0][:200]}); fix: check that "
                             "the model folder is trained for this fold and nnUNet_extTrainer is set "
                             "(export nnUNet_extTrainer=$(nnUNetv2_fseft_ext_path))")
        return {case: np.load(tmp / "out" / f"{case}.npz")["probabilities"] for case in images}


def confident_labels(probabilities: np.ndarray, threshold: float = CONFIDENCE):
    """(label map, trusted mask) from (C, ...) softmax probabilities."""
    return probabilities.argmax(0).astype(np.uint8), probabilities.max(0) >= threshold
