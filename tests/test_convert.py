"""nnUNetv2_fseft_convert: per-structure layout -> raw dataset, and raw dataset relabelling (CPU, 16^3 volumes)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_fseft.data.convert import convert_structures, parse_label_spec, relabel_dataset
from nnunetv2_fseft.errors import FSEFTError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAPE = (16, 16, 16)  # z, y, x


@pytest.fixture
def raw(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    return tmp_path / "nnUNet_raw"


def write(array, path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def box(z0, z1, y0=2, y1=14, x0=2, x1=14):
    m = np.zeros(SHAPE, np.uint8)
    m[z0:z1, y0:y1, x0:x1] = 1
    return m


def structure_case(root, case, masks, spacing=(1.5, 1.0, 2.0), origin=(10.0, -5.0, 3.0)):
    write(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32), root / case / "ct.nii.gz", spacing, origin)
    for name, m in masks.items():
        write(m, root / case / "segmentations" / f"{name}.nii.gz", spacing, origin)
    return root / case


def hashes(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture
def cases(tmp_path):
    src = tmp_path / "src"
    empty = np.zeros(SHAPE, np.uint8)
    structure_case(src, "s1", {"liver": box(0, 5), "spleen": box(8, 12), "kidney_left": box(13, 15), "esophagus": empty})
    structure_case(src, "s2", {"liver": box(1, 6), "spleen": box(9, 11), "kidney_left": empty, "esophagus": empty})
    return src


def test_structures_default_keeps_nonempty_and_reports_empty(raw, cases, capsys):
    before = hashes(cases)
    out = convert_structures([cases], 11, "Toy")
    assert out == raw / "Dataset011_Toy"
    dj = json.loads((out / "dataset.json").read_text())
    # esophagus is empty everywhere: dropped; order alphabetical
    assert dj["labels"] == {"background": 0, "kidney_left": 1, "liver": 2, "spleen": 3}
    assert dj["channel_names"] == {"0": "CT"} and dj["numTraining"] == 2 and dj["file_ending"] == ".nii.gz"
    lab = sitk.ReadImage(str(out / "labelsTr" / "s1.nii.gz"))
    img = sitk.ReadImage(str(out / "imagesTr" / "s1_0000.nii.gz"))
    assert lab.GetSpacing() == img.GetSpacing() == (1.5, 1.0, 2.0) and lab.GetOrigin() == img.GetOrigin()
    a = sitk.GetArrayFromImage(lab)
    assert (a[0:5, 2:14, 2:14] == 2).all() and a[0:5].sum() == 2 * 5 * 12 * 12 and (a[8:12, 2:14, 2:14] == 3).all() and (a[13:15, 2:14, 2:14] == 1).all()
    assert set(np.unique(read(out / "labelsTr" / "s2.nii.gz"))) == {0, 2, 3}
    assert os.path.samefile(out / "imagesTr" / "s1_0000.nii.gz", cases / "s1" / "ct.nii.gz")  # linked
    assert "empty masks" in capsys.readouterr().out
    assert hashes(cases) == before


def test_structures_explicit_order_and_empty_report(raw, cases, capsys):
    out = convert_structures([cases / "s1", cases / "s2"], 12, "Toy", structures=["Spleen", "esophagus"])
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "spleen": 1, "esophagus": 2}
    printed = capsys.readouterr().out
    assert "'s1': esophagus" in printed and "'s2': esophagus" in printed


def test_overlap_is_error_unless_priority(raw, tmp_path):
    src = tmp_path / "ov"
    structure_case(src, "c1", {"aorta": box(0, 10), "aorta_lumen": box(4, 6)})
    with pytest.raises(FSEFTError, match=r"case 'c1'.*'aorta' and 'aorta_lumen' overlap.*--priority"):
        convert_structures([src], 13, "Ov")
    assert not any(raw.iterdir())  # nothing half-written
    out = convert_structures([src], 13, "Ov", priority=["aorta_lumen"])
    a = read(out / "labelsTr" / "c1.nii.gz")
    assert (a[4:6, 2:14, 2:14] == 2).all() and (a[0:4, 2:14, 2:14] == 1).all()


def test_non_binary_mask_is_error(raw, tmp_path):
    src = tmp_path / "nb"
    structure_case(src, "c1", {"liver": box(0, 5) * 255})
    with pytest.raises(FSEFTError, match=r"case 'c1'.*liver.nii.gz is not binary.*255"):
        convert_structures([src], 14, "Nb")


def test_geometry_mismatch_names_case_and_field(raw, tmp_path):
    src = tmp_path / "geo"
    case = structure_case(src, "bad_case", {"liver": box(0, 5)})
    write(box(0, 5), case / "segmentations" / "liver.nii.gz", spacing=(1.0, 1.0, 1.0), origin=(10.0, -5.0, 3.0))
    with pytest.raises(FSEFTError, match=r"case 'bad_case': mask segmentations/liver.nii.gz has spacing \(1, 1, 1\) but ct.nii.gz has \(1.5, 1, 2\)"):
        convert_structures([src], 15, "Geo")


def test_unknown_structure_lists_available(raw, cases):
    with pytest.raises(FSEFTError, match=r"unknown structure 'pancreas'; available: esophagus, kidney_left, liver, spleen"):
        convert_structures([cases], 16, "Toy", structures=["pancreas"])


def test_existing_output_refused_without_overwrite(raw, cases):
    convert_structures([cases], 17, "Toy", structures=["liver"])
    with pytest.raises(FSEFTError, match="already exists.*--overwrite"):
        convert_structures([cases], 17, "Toy", structures=["liver"])
    out = convert_structures([cases], 17, "Toy", structures=["spleen"], overwrite=True)
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "spleen": 1}


def make_raw_dataset(raw, did, name, labels, label_maps):
    folder = raw / f"Dataset{did:03d}_{name}"
    for case, seg in label_maps.items():
        write(np.random.default_rng(1).normal(size=SHAPE).astype(np.float32), folder / "imagesTr" / f"{case}_0000.nii.gz")
        write(seg.astype(np.uint8), folder / "labelsTr" / f"{case}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": len(label_maps), "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture
def organs(raw):
    seg = box(0, 4) + 2 * box(4, 6) + 3 * box(8, 10) + 4 * box(12, 14)
    return make_raw_dataset(raw, 21, "Organs", {"background": 0, "liver": 1, "liver_tumor": 2, "kidney_left": 3,
                                                "kidney_right": 4}, {"a": seg, "b": seg})


def test_relabel_subset_rename_merge(raw, organs, capsys):
    before = hashes(organs)
    spec = parse_label_spec(["hepar=liver,Liver Tumor", "kidney=kidney_left,kidney_right"])
    out = relabel_dataset(21, 22, "Merged", spec)
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "hepar": 1, "kidney": 2} and dj["numTraining"] == 2
    a = read(out / "labelsTr" / "a.nii.gz")
    assert (a[0:6, 2:14, 2:14] == 1).all() and (a[8:10, 2:14, 2:14] == 2).all() and (a[12:14, 2:14, 2:14] == 2).all()
    assert os.path.samefile(out / "imagesTr" / "a_0000.nii.gz", organs / "imagesTr" / "a_0000.nii.gz")
    assert hashes(organs) == before


def test_relabel_binary_task(raw, organs):
    out = relabel_dataset("Dataset021_Organs", 23, "Tumor", {"liver_tumor": ["liver_tumor"]})
    a = read(out / "labelsTr" / "b.nii.gz")
    assert set(np.unique(a)) == {0, 1} and (a[4:6, 2:14, 2:14] == 1).all() and a.sum() == 2 * 12 * 12


def test_relabel_errors(raw, organs, tmp_path):
    with pytest.raises(FSEFTError, match="unknown label 'spleen' in Dataset021_Organs; available: liver, liver_tumor, kidney_left, kidney_right"):
        relabel_dataset(21, 24, "X", {"spleen": ["spleen"]})
    with pytest.raises(FSEFTError, match="is the id of source"):
        relabel_dataset(21, 21, "Organs", {"liver": ["liver"]}, overwrite=True)
    (tmp_path / "nojson").mkdir()
    with pytest.raises(FSEFTError, match="has no dataset.json"):
        relabel_dataset(tmp_path / "nojson", 25, "X", {"liver": ["liver"]})
    with pytest.raises(FSEFTError, match="malformed"):
        parse_label_spec(["liver"])
    shifted = make_raw_dataset(raw, 26, "Shifted", {"background": 0, "liver": 1}, {"b": box(0, 4)})
    write(box(0, 4), shifted / "labelsTr" / "b.nii.gz", origin=(0.0, 0.0, 5.0))  # label off the image grid
    with pytest.raises(FSEFTError, match=r"case 'b': label b.nii.gz has origin \(0, 0, 5\) but image b_0000"):
        relabel_dataset(26, 27, "X", {"liver": ["liver"]})


def console_script(name):
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", "nnunetv2_fseft.cli.convert"]


def test_cli_bad_input_is_one_line_exit_2(raw, cases):
    cmd = console_script("nnUNetv2_fseft_convert") + ["structures", str(cases), "-o", "31", "-n", "Cli",
                                                      "--structures", "pancreas"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "nnunetv2_fseft: error: unknown structure 'pancreas'; available: esophagus, kidney_left, liver, spleen"]


@pytest.mark.skipif(not (DATA / "ct" / "totalseg_subject1").exists(), reason="shared real data absent")
def test_real_totalseg_subject1(raw):
    subject = DATA / "ct" / "totalseg_subject1"
    before = hashes(subject)
    out = convert_structures([subject], 41, "TotalSegS1", structures=["liver", "spleen", "kidney_left"])
    lab = sitk.ReadImage(str(out / "labelsTr" / "totalseg_subject1.nii.gz"))
    ct = sitk.ReadImage(str(subject / "ct.nii.gz"))
    assert lab.GetSize() == ct.GetSize() == (122, 101, 112)
    assert lab.GetDirection() == ct.GetDirection() and np.allclose(lab.GetOrigin(), ct.GetOrigin())
    counts = np.bincount(sitk.GetArrayFromImage(lab).ravel(), minlength=4)
    assert counts[1:].tolist() == [41602, 9677, 5144]  # voxel counts of the three source masks
    assert hashes(subject) == before


@pytest.mark.skipif(not (DATA / "ct" / "totalseg_subject2").exists(), reason="shared real data absent")
def test_real_totalseg_subject2_empty_masks_and_overlaps(raw, capsys):
    """subject2 is a thoracic crop: iliac arteries and renal arteries are empty masks, and the aorta overlaps
    its true/false lumen. By default the empty ones are dropped (non-empty in no case); named explicitly they
    are kept as labels and reported; the aorta/lumen overlap needs --priority."""
    subject = DATA / "ct" / "totalseg_subject2"
    with pytest.raises(FSEFTError, match="'aorta' and 'aorta_false_lumen' overlap"):
        convert_structures([subject], 42, "S2", structures=["aorta", "aorta_false_lumen"])
    out = convert_structures([subject], 42, "S2", structures=["aorta", "aorta_true_lumen", "renal_arteries"],
                             priority=["aorta_true_lumen"])
    printed = capsys.readouterr().out
    assert "'totalseg_subject2': renal_arteries" in printed and "'aorta_true_lumen' over 'aorta'" in printed
    counts = np.bincount(read(out / "labelsTr" / "totalseg_subject2.nii.gz").ravel(), minlength=4)
    assert counts[2] == 37595 and counts[3] == 0
