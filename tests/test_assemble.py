"""nnUNetv2_fseft_assemble: unified label space, synonyms, keep-separate, contained structures as nnU-Net
regions, per-case annotated classes (fseft_cases), and nnU-Net accepting the result (CPU, 16^3 volumes)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_fseft.data.assemble import assemble_datasets, build_label_space, load_synonyms
from nnunetv2_fseft.errors import FSEFTError

SHAPE = (16, 16, 16)


@pytest.fixture
def raw(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    return tmp_path / "nnUNet_raw"


def write(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.5))
    sitk.WriteImage(image, str(path))


def slab(z0, z1, value):
    m = np.zeros(SHAPE, np.uint8)
    m[z0:z1, 2:14, 2:14] = value
    return m


def make_raw_dataset(raw, did, name, labels, seg, n_cases=2, channels=None, ending=".nii.gz"):
    folder = raw / f"Dataset{did:03d}_{name}"
    channels = channels or {"0": "CT"}
    rng = np.random.default_rng(did)
    for i in range(n_cases):
        for c in range(len(channels)):
            write(rng.normal(size=SHAPE).astype(np.float32), folder / "imagesTr" / f"case{i}_{c:04d}{ending}")
        write(seg.astype(np.uint8), folder / "labelsTr" / f"case{i}{ending}")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": channels, "labels": labels, "numTraining": n_cases, "file_ending": ending}))
    return folder


@pytest.fixture
def sources(raw):
    """Three partially labelled datasets whose class names differ in case, spacing and language."""
    return {
        11: make_raw_dataset(raw, 11, "Liver", {"background": 0, "Liver": 1, "liver tumor": 2},
                             slab(0, 6, 1) + slab(2, 4, 1)),  # tumour (2) inside the liver slab
        12: make_raw_dataset(raw, 12, "Organs", {"background": 0, "liver": 1, "Kidney-Left": 2, "spleen": 3},
                             slab(0, 6, 1) + slab(8, 10, 2) + slab(12, 14, 3)),
        13: make_raw_dataset(raw, 13, "Hepar", {"background": 0, "hepar": 1, "left kidney": 2},
                             slab(0, 6, 1) + slab(8, 10, 2)),
    }


def hashes(folders):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def load(out):
    return json.loads((out / "dataset.json").read_text())


def test_unify_by_normalised_name(raw, sources, capsys):
    before = hashes(sources.values())
    out = assemble_datasets([11, "Dataset012_Organs"], 100, "Foundation")
    dj = load(out)
    assert dj["labels"] == {"background": 0, "Liver": 1, "liver tumor": 2, "Kidney-Left": 3, "spleen": 4}
    assert "regions_class_order" not in dj and dj["numTraining"] == 4
    assert dj["fseft_cases"] == {
        "D011_case0": {"dataset": "Dataset011_Liver", "annotated": ["Liver", "liver tumor"]},
        "D011_case1": {"dataset": "Dataset011_Liver", "annotated": ["Liver", "liver tumor"]},
        "D012_case0": {"dataset": "Dataset012_Organs", "annotated": ["Liver", "Kidney-Left", "spleen"]},
        "D012_case1": {"dataset": "Dataset012_Organs", "annotated": ["Liver", "Kidney-Left", "spleen"]},
    }
    seg = read(out / "labelsTr" / "D012_case0.nii.gz")
    assert (seg == slab(0, 6, 1) + slab(8, 10, 3) + slab(12, 14, 4)).all()  # remapped 2->3, 3->4
    assert (read(out / "labelsTr" / "D011_case1.nii.gz") == slab(0, 6, 1) + slab(2, 4, 1)).all()
    assert os.path.samefile(out / "imagesTr" / "D012_case1_0000.nii.gz", sources[12] / "imagesTr" / "case1_0000.nii.gz")
    assert hashes(sources.values()) == before
    assert "Liver <- Dataset011_Liver:Liver, Dataset012_Organs:liver" in capsys.readouterr().out


def test_synonyms_and_conflict(raw, sources, tmp_path):
    syn = tmp_path / "syn.json"
    syn.write_text(json.dumps({"liver": ["hepar"], "kidney_left": ["left kidney", "kidney_l"]}))
    out = assemble_datasets([11, 12, 13], 101, "Syn", synonyms=syn)
    dj = load(out)
    assert dj["labels"] == {"background": 0, "liver": 1, "liver tumor": 2, "kidney_left": 3, "spleen": 4}
    assert dj["fseft_cases"]["D013_case0"]["annotated"] == ["liver", "kidney_left"]
    assert (read(out / "labelsTr" / "D013_case0.nii.gz") == slab(0, 6, 1) + slab(8, 10, 3)).all()
    with pytest.raises(FSEFTError, match="synonym conflict.*'Hepar' maps to both 'liver' and 'spleen'"):
        load_synonyms({"liver": ["hepar"], "spleen": ["Hepar"]})
    with pytest.raises(FSEFTError, match="Dataset013_Hepar: labels 'hepar' and 'leber' would both become"):
        build_label_space({"Dataset013_Hepar": ["hepar", "leber"]}, load_synonyms({"liver": ["hepar", "leber"]}))


def test_keep_separate(raw, sources):
    dj = load(assemble_datasets([11, 12], 102, "Sep", keep_separate=True))
    assert list(dj["labels"]) == ["background", "Dataset011_Liver:Liver", "Dataset011_Liver:liver tumor",
                                  "Dataset012_Organs:liver", "Dataset012_Organs:Kidney-Left",
                                  "Dataset012_Organs:spleen"]
    assert dj["fseft_cases"]["D012_case0"]["annotated"] == [
        "Dataset012_Organs:liver", "Dataset012_Organs:Kidney-Left", "Dataset012_Organs:spleen"]


def test_contains_writes_nnunet_regions(raw, sources):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    out = assemble_datasets([11, 12], 103, "Regions", contains={"liver": ["liver_tumor"]})
    dj = load(out)
    assert dj["labels"] == {"background": 0, "Liver": [1, 2], "liver tumor": 2, "Kidney-Left": 3, "spleen": 4}
    assert dj["regions_class_order"] == [1, 2, 3, 4]
    assert dj["fseft_cases"]["D011_case0"]["annotated"] == ["Liver", "liver tumor"]
    lm = LabelManager(dj["labels"], dj["regions_class_order"])
    assert lm.has_regions and lm.num_segmentation_heads == 4
    seg = read(out / "labelsTr" / "D011_case0.nii.gz")
    liver_region = lm.foreground_regions[0]
    assert np.isin(seg, liver_region).sum() == 6 * 12 * 12  # the whole slab, tumour voxels included
    assert (np.isin(seg, liver_region)[seg == 2]).all() and (seg == 2).sum() == 2 * 12 * 12


def test_contains_orders_container_first_and_rejects_cycles():
    names, mapping, regions = build_label_space({"A": ["cyst", "tumour", "kidney"]},
                                                contains={"kidney": ["cyst"], "cyst": ["tumour"]})
    assert names == ["kidney", "cyst", "tumour"] and regions == {"kidney": ["cyst", "tumour"], "cyst": ["tumour"]}
    names, _, _ = build_label_space({"A": ["kidney_left", "spleen"], "B": ["kidney"]},
                                    contains={"kidney": ["kidney_left"]})
    assert names == ["kidney", "kidney_left", "spleen"]  # the container moves up to just before its part
    with pytest.raises(FSEFTError, match="cycle"):
        build_label_space({"A": ["a", "b"]}, contains={"a": ["b"], "b": ["a"]})
    with pytest.raises(FSEFTError, match="unknown class 'pancreas'; classes: a, b"):
        build_label_space({"A": ["a", "b"]}, contains={"a": ["pancreas"]})


def test_incompatible_sources_and_existing_output(raw, sources):
    make_raw_dataset(raw, 14, "MR", {"background": 0, "liver": 1}, slab(0, 6, 1), channels={"0": "T1"})
    with pytest.raises(FSEFTError, match=r"Dataset014_MR has channels \['T1'\] but Dataset011_Liver has \['CT'\]"):
        assemble_datasets([11, 14], 104, "Bad")
    make_raw_dataset(raw, 15, "Nrrd", {"background": 0, "liver": 1}, slab(0, 6, 1), ending=".nrrd")
    with pytest.raises(FSEFTError, match="file_ending '.nrrd'"):
        assemble_datasets([11, 15], 104, "Bad")
    with pytest.raises(FSEFTError, match="is the id of source"):
        assemble_datasets([11, 12], 12, "Organs", overwrite=True)
    assemble_datasets([11, 12], 105, "Twice")
    with pytest.raises(FSEFTError, match="Dataset105_Twice already exists; fix: pass --overwrite"):
        assemble_datasets([11, 12], 105, "Twice")
    assert load(assemble_datasets([11], 105, "Twice", overwrite=True))["numTraining"] == 2


def test_cli_bad_input_is_one_line_exit_2(raw, sources):
    script = Path(sys.executable).parent / "nnUNetv2_fseft_assemble"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "nnunetv2_fseft.cli.assemble"]
    r = subprocess.run(cmd + ["-d", "11", "99", "-o", "106", "-n", "Cli"], capture_output=True, text=True,
                       env=os.environ.copy(), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnunetv2_fseft: error: cannot find dataset '99'")


@pytest.mark.skipif(os.environ.get("FSEFT_SLOW_TESTS") != "1",
                    reason="starts nnU-Net worker processes (45-140 s on 2 busy cores); set FSEFT_SLOW_TESTS=1")
def test_nnunet_plan_and_preprocess_accepts_assembled_dataset(raw, sources):
    """nnU-Net keeps the extra fseft_cases key and accepts the region labels (contract with the trainer)."""
    out = assemble_datasets([11, 12], 107, "Plan", contains={"liver": ["liver_tumor"]})
    r = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", "107",
                        "-c", "3d_fullres", "-np", "1", "-npfp", "1", "--verify_dataset_integrity"],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    pre = Path(os.environ["nnUNet_preprocessed"]) / out.name
    assert json.loads((pre / "dataset.json").read_text()) == load(out)
    assert len(list((pre / "nnUNetPlans_3d_fullres").glob("*_seg.b2nd"))) == 4
