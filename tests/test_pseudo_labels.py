"""Learning from unlabelled scans (nnUNetv2_fseft_pseudolabel): registration on phantoms, the ignore-label dataset,
the refusals, and one tiny end-to-end round through nnUNetv2_train and nnUNetv2_predict."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_fseft.pseudo.dataset import PSEUDO_PREFIX
from nnunetv2_fseft.pseudo.registration import fuse, propagate
from nnunetv2_fseft.synthetic import phantom
from phantom_world import foundation_and_target

BIN = Path(sys.executable).parent
TRAINER = "FSEFTDecoderLoRATrainer_test"


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_registration_carries_a_support_label_onto_another_subject():
    rng = np.random.default_rng(0)
    fixed, fixed_masks = phantom((32, 32, 32), rng)
    moving, moving_masks = phantom((32, 32, 32), rng)
    label = np.zeros(moving.shape, np.uint8)
    label[moving_masks["liver"]], label[moving_masks["spleen"]] = 1, 2
    propagated = propagate(sitk.GetImageFromArray(fixed), sitk.GetImageFromArray(moving),
                           sitk.GetImageFromArray(label))
    assert _dice(propagated == 1, fixed_masks["liver"]) > 0.8
    assert _dice(propagated == 2, fixed_masks["spleen"]) > 0.6
    truth = np.zeros_like(label)
    truth[fixed_masks["liver"]], truth[fixed_masks["spleen"]] = 1, 2
    fused, trusted = fuse([propagated], 3, margin=1)
    # the band next to a propagated boundary is where registration errs: trusted voxels are right more often
    assert 0.5 < trusted.mean() < 1
    assert (fused[trusted] == truth[trusted]).mean() > (fused[~trusted] == truth[~trusted]).mean()
    assert (fused[trusted] == truth[trusted]).mean() > 0.97


def test_fusion_trusts_only_where_every_support_agrees():
    a = np.zeros((9, 9, 9), np.uint8)
    a[2:7, 2:7, 2:7] = 1
    b = np.zeros_like(a)
    b[3:8, 2:7, 2:7] = 1
    fused, trusted = fuse([a, b, b], 2, margin=0)
    assert (fused == b).all()  # majority
    assert not trusted[2, 4, 4] and not trusted[7, 4, 4]  # the supports disagree there
    assert trusted[4, 4, 4] and trusted[0, 0, 0]


@pytest.fixture(scope="module")
def world(nnunet_env):
    """A tiny foundation; target (spleen, pancreas) with one support, two query cases, three unlabelled scans."""
    from nnunetv2_fseft.data.fewshot import write_fewshot_splits
    from nnunetv2_fseft.planning import prepare_target
    foundation = foundation_and_target(nnunet_env, 961, 962, prefix="Ps")
    prepare_target(962, foundation, num_processes=1)
    table = write_fewshot_splits(962, ks=[1], seeds=[0], n_query=2)
    fold = dict(table["folds"][0], val=table["query"])
    raw = nnunet_env / "raw" / "Dataset962_PsTarget"
    cases = sorted(p.name[:-len(".nii.gz")] for p in (raw / "labelsTr").iterdir())
    pool = [c for c in cases if c not in fold["train"] + fold["val"]]
    images = nnunet_env / "unlabelled"
    images.mkdir()
    for case in pool:
        shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", images)
    return {"root": nnunet_env, "foundation": foundation, "images": images, "fold": fold, "pool": pool,
            "weights": foundation / "fold_0" / "checkpoint_final.pth", "raw": raw}


def _cli(*argv):
    return subprocess.run([str(BIN / "nnUNetv2_fseft_pseudolabel"), *map(str, argv)], capture_output=True, text=True)


def _refused(r, *words):
    assert r.returncode == 2, r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_registration_pseudo_labels_make_an_ignore_label_dataset(world):
    from nnunetv2_fseft.pseudo.pipeline import Request, run
    rounds = run(Request("962", world["fold"]["fold"], world["images"], 963, num_processes=1), log=lambda m: None)
    name = rounds[0]["dataset"]
    raw, pre = world["root"] / "raw" / name, world["root"] / "pre" / name
    dataset_json = json.loads((raw / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "spleen": 1, "pancreas": 2, "ignore": 3}
    target_raw = world["raw"]
    for case in world["pool"]:
        pseudo = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{PSEUDO_PREFIX}{case}.nii.gz")))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(target_raw / "labelsTr" / f"{case}.nii.gz")))
        assert 0 < (pseudo == 3).mean() < 0.5  # boundaries left to the ignore label
        known = pseudo != 3
        assert (pseudo[known] == truth[known]).mean() > 0.95
        assert (pseudo == 1).sum() > 0 and (pseudo[truth == 1] == 1).any()  # the spleen's core is labelled
    split = json.loads((pre / "splits_final.json").read_text())
    support = world["fold"]["train"][0]
    assert split[0]["val"] == world["fold"]["val"]
    assert split[0]["train"].count(support) == len(world["pool"])  # supports drawn as often as the pseudo cases
    assert json.loads((pre / "nnUNetPlans.json").read_text())["configurations"] == \
        json.loads((world["root"] / "pre" / "Dataset962_PsTarget" / "nnUNetPlans.json").read_text())["configurations"]
    assert (pre / "nnUNetPlans_3d_fullres").is_dir()
    # the target is untouched and a second run refuses to overwrite
    assert not (target_raw / "labelsTr" / f"{PSEUDO_PREFIX}{world['pool'][0]}.nii.gz").exists()
    _refused(_cli("-d", 962, "-f", world["fold"]["fold"], "-i", world["images"], "-o", 963), "already exists",
             "--overwrite")


def test_atlas_writes_propagated_labels_as_predictions(world, tmp_path):
    r = _cli("--atlas", "-d", 962, "-f", world["fold"]["fold"], "-i", world["images"], "-o", tmp_path / "atlas")
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in (tmp_path / "atlas").iterdir())
    assert written == sorted(f"{c}.nii.gz" for c in world["pool"])
    _refused(_cli("--atlas", "-d", 962, "-f", world["fold"]["fold"], "-i", world["images"], "-o",
                  tmp_path / "atlas"), "exists", "--overwrite")


def test_refusals_are_one_line_and_write_nothing(world, tmp_path):
    fold = world["fold"]["fold"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(_cli("-d", 962, "-f", fold, "-i", empty, "-o", 964), "no CASE_0000.nii.gz")
    two = tmp_path / "two_channels"
    two.mkdir()
    src = world["images"] / f"{world['pool'][0]}_0000.nii.gz"
    shutil.copy(src, two / "a_0000.nii.gz")
    shutil.copy(src, two / "a_0001.nii.gz")
    _refused(_cli("-d", 962, "-f", fold, "-i", two, "-o", 964), "channels 0000, 0001", "1")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x_0000.nii.gz").write_bytes(b"not an image")
    _refused(_cli("-d", 962, "-f", fold, "-i", broken, "-o", 964), "cannot read", "x_0000.nii.gz")
    _refused(_cli("-d", 962, "-f", fold, "-i", world["images"], "-o", 964, "--labels", "model"), "-m MODEL_FOLDER")
    _refused(_cli("-d", 962, "-f", 7, "-i", world["images"], "-o", 964), "fold 7")
    assert not list((world["root"] / "raw").glob("Dataset964_*"))


def test_a_failed_registration_skips_that_scan_and_goes_on(world, tmp_path):
    from nnunetv2_fseft.pseudo.pipeline import read_target, registration_labels
    folder = tmp_path / "with_blank"
    shutil.copytree(world["images"], folder)
    template = sitk.ReadImage(str(folder / f"{world['pool'][0]}_0000.nii.gz"))
    blank = sitk.Image(template.GetSize(), sitk.sitkFloat32)
    blank.CopyInformation(template)
    sitk.WriteImage(blank, str(folder / "blank_0000.nii.gz"))
    from nnunetv2_fseft.pseudo.images import unlabelled_cases
    target = read_target("962", world["fold"]["fold"])
    said = []
    labels = registration_labels(target, unlabelled_cases(folder, ".nii.gz", {"0": "CT"}), 1, said.append)
    assert sorted(labels) == sorted(world["pool"])
    assert len(said) == 1 and said[0].startswith("skipped blank: registration failed")


def test_one_round_of_self_training_end_to_end(world):
    """--labels both with -tr and no model: the supports' fold is trained first, its confident voxels that agree
    with registration label the pool, and the pseudo-labelled dataset trains; nnUNetv2_predict uses the result."""
    fold = world["fold"]["fold"]
    r = _cli("-d", 962, "-f", fold, "-i", world["images"], "-o", 965, "--labels", "both", "-tr", TRAINER,
             "-pretrained_weights", world["weights"], "--threshold", "0.5", "-np", 1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = world["root"] / "res"
    assert (results / "Dataset962_PsTarget" / f"{TRAINER}__nnUNetPlans__3d_fullres" / f"fold_{fold}" /
            "checkpoint_final.pth").is_file()  # the supports-only model that labelled the pool
    model = results / "Dataset965_PsTargetPseudo" / f"{TRAINER}__nnUNetPlans__3d_fullres"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    out = world["root"] / "pred_pseudo"
    p = subprocess.run([str(BIN / "nnUNetv2_predict"), "-i", str(world["images"]), "-o", str(out), "-d", "965",
                        "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", "cpu", "--disable_tta",
                        "-npp", "1", "-nps", "1"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{world['pool'][0]}.nii.gz")))
    assert set(np.unique(predicted)) <= {0, 1, 2}  # never the ignore label
