"""The default nnUNetv2_fseft_demo, run once as a user runs it (about 5 minutes on 2 CPU cores), checked for what a
user reads in its output: the foundation learned every organ it was shown, and few-shot adaptation beats nnU-Net
from scratch on the known organ and, with decoder + LoRA, on the organ no foundation dataset labels."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_fseft.demo.settings import default_settings
from nnunetv2_fseft.demo.stages import phantom_spacing
from nnunetv2_fseft.demo.workdir import Workdir, nnunet_env
from nnunetv2_fseft.synthetic import write_phantom_dataset

BIN = Path(sys.executable).parent
ORGANS = ("liver", "spleen", "kidney_left", "kidney_right")
SCRATCH = "from scratch (nnU-Net)"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(work dir, stdout, results.json) of one default demo run in an environment without nnU-Net's variables."""
    workdir = tmp_path_factory.mktemp("story") / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") and k != "FSEFT_DEMO_TORCH_THREADS"}
    r = subprocess.run([str(BIN / "nnUNetv2_fseft_demo"), "--workdir", str(workdir)], capture_output=True, text=True,
                       env=env, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return workdir, r.stdout, json.loads((workdir / "results.json").read_text())


def _dice(results: dict, method: str, k: int, organ: str) -> float:
    return next(run["dice_per_class"][organ] for run in results["runs"] if run["method"] == method and run["k"] == k)


@pytest.mark.slow
def test_the_foundation_learned_every_organ_it_was_shown(demo):
    """Held-out Dice >= 0.8 per organ (nnU-Net's final validation of the foundation), as printed and recorded."""
    _, stdout, results = demo
    foundation = results["context"]["foundation_scores"]
    assert set(foundation) == set(ORGANS)
    assert all(dice is not None and dice >= 0.8 for dice in foundation.values()), foundation
    printed = next(line for line in stdout.splitlines() if "foundation ready" in line)
    assert all(f"{organ} {dice:.2f}" in printed for organ, dice in foundation.items()), printed


@pytest.mark.slow
def test_nnunet_predict_paints_the_organs_of_both_partially_labelled_datasets(demo, tmp_path):
    """The spleen is labelled only in one foundation dataset, the kidneys only in the other: nnUNetv2_predict with
    the foundation paints all four organs in a new subject, each where the truth has it."""
    workdir, _, results = demo
    settings = default_settings()
    subject = write_phantom_dataset(tmp_path, 990, "NewSubject", list(ORGANS), 1, shape=settings.phantom_shape,
                                    spacing=phantom_spacing(settings), seed=99)
    out = tmp_path / "predicted"
    model = results["context"]["foundation"]["dataset"]
    r = subprocess.run([str(BIN / "nnUNetv2_predict"), "-i", str(subject / "imagesTr"), "-o", str(out), "-d", model,
                        "-c", "3d_fullres", "-f", "0", "-tr", results["context"]["foundation_trainer"],
                        "-device", "cpu",
                        "--disable_tta", "-npp", "0", "-nps", "0", "--disable_progress_bar"],
                       capture_output=True, text=True, env={**os.environ, **nnunet_env(Workdir(workdir))}, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    labels = json.loads((workdir / "nnUNet_raw" / model / "dataset.json").read_text())["labels"]
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "newsubject_000.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(subject / "labelsTr" / "newsubject_000.nii.gz")))
    dice = {}
    for value, organ in enumerate(ORGANS, 1):
        a, b = seg == labels[organ], truth == value
        dice[organ] = 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())
    assert min(dice.values()) > 0.7, dice


@pytest.mark.slow
def test_adapted_methods_beat_nnunet_from_scratch(demo):
    """On the known organ from a new scanner every adapted method is ahead of from-scratch; on the new organ
    decoder + LoRA finds it at K = 1 and 5, well ahead of from-scratch."""
    _, _, results = demo
    adapted = {run["method"] for run in results["runs"] if run["pretrained"]}
    assert {"linear probe", "decoder + encoder LoRA", "full fine-tuning"} <= adapted
    for k in (1, 5):
        for method in adapted:
            assert _dice(results, method, k, "liver") > _dice(results, SCRATCH, k, "liver"), (method, k)
        novel = _dice(results, "decoder + encoder LoRA", k, "pancreas")
        assert novel > 0.5 and novel > _dice(results, SCRATCH, k, "pancreas") + 0.3, (k, novel)
