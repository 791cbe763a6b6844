"""The abdominal benchmark's data (issue 8): priors, split, the CT synthesiser, and a tiny run of the harness on it.

Tests needing torchio skip without it (an optional extra); tests needing the real label maps skip without
../shared/data. Tiny phantom label maps stand in for the real ones so that the generator is tested everywhere."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import SHARED_DATA
from md_tables import row, tables

REPO = Path(__file__).resolve().parents[1]
PRIORS_FILE = REPO / "benchmarks" / "abdomen_priors.json"
SPLIT = json.loads((REPO / "benchmarks" / "abdomen_split.json").read_text())
REAL_LABELS = SHARED_DATA / "abdomen_labels_l2r"
ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus", 6: "liver",
          7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_vein_and_splenic_vein", 11: "pancreas",
          12: "adrenal_gland_right", 13: "adrenal_gland_left"}
needs_real_data = pytest.mark.skipif(not REAL_LABELS.is_dir(), reason="../shared/data/abdomen_labels_l2r is absent")


@pytest.fixture(scope="module", autouse=True)
def benchmarks_importable():
    """benchmarks/abdomen_synth and the benchmark's scripts import as they do when run from benchmarks/."""
    with pytest.MonkeyPatch.context() as m:
        m.syspath_prepend(str(REPO / "benchmarks"))
        yield


@pytest.fixture(scope="module")
def tio():
    return pytest.importorskip("torchio")


@pytest.fixture(scope="module")
def priors():
    from abdomen_synth.priors import load_priors
    return load_priors(PRIORS_FILE)


def _ellipsoid(shape, center, radii):
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), center, radii)) <= 1


def write_phantom_labels(folder: Path, subject: str, shift: int = 0) -> Path:
    """A small abdomen-like label map at 4 mm, oriented like the Learn2Reg maps (array z, y, x; y grows anteriorly,
    z cranially): liver right, spleen left, kidneys posterior, aorta and pancreas in the middle, stomach left."""
    shape = (30, 60, 68)
    a = np.zeros(shape, np.int8)
    parts = [(6, (18, 24, 14 + shift), (8, 9, 10)), (1, (19, 18, 36), (5, 5, 5)), (2, (12, 12, 16), (5, 4, 4)),
             (3, (12, 12, 33), (5, 4, 4)), (7, (18, 25, 32 - shift), (5, 6, 6)), (8, (14, 17, 25), (12, 2, 2)),
             (11, (13, 22, 27), (2, 3, 7)), (4, (13, 26, 14), (2, 2, 2))]
    for value, center, radii in parts:  # in the middle of a field wide enough for the body and air around it
        center = (center[0], center[1] + 12, center[2] + 10)
        a[_ellipsoid(shape, center, radii) & (a == 0)] = value
    image = sitk.GetImageFromArray(a)
    image.SetSpacing((4.0, 4.0, 4.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps({str(k): v for k, v in ORGANS.items()}))
    sitk.WriteImage(image, str(folder / f"{subject}.nii.gz"))
    return folder / f"{subject}.nii.gz"


def coarse_copy(source: Path, folder: Path, spacing=4.0) -> Path:
    """A real label map resampled (nearest neighbour) to a coarse grid, written elsewhere: fast tests on real
    anatomy; the source is only read."""
    image = sitk.ReadImage(str(source))
    size = [int(round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor, image.GetOrigin(), [spacing] * 3,
                        image.GetDirection(), 0, image.GetPixelID())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps({str(k): v for k, v in ORGANS.items()}))
    sitk.WriteImage(out, str(folder / source.name))
    return folder / source.name


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ priors, split

def test_priors_cover_every_organ_in_both_domains_with_cited_sources(priors):
    raw = json.loads(PRIORS_FILE.read_text())
    assert set(priors.domains) == {"A", "B"}
    for organ in ORGANS.values():
        for domain in "AB":
            mean, std, jitter = priors.gaussian(organ, domain)
            assert std > 0 and -1000 <= mean <= 400
        cited = raw["tissues"][organ]["sources"]
        assert cited and set(cited) <= set(raw["sources"]), organ
    # domain B is another contrast phase, scanner and dose: organ means, noise and slices differ
    assert any(priors.gaussian(o, "A")[0] != priors.gaussian(o, "B")[0] for o in ORGANS.values())
    a, b = priors.domain("A"), priors.domain("B")
    assert b.noise_hu > a.noise_hu and b.slice_thickness_mm > a.slice_thickness_mm


def test_organs_that_look_alike_in_ct_overlap_and_vessels_are_bright(priors):
    # portal-venous phase (A): liver, spleen, pancreas and stomach wall all within one std sum of each other
    soft = [priors.gaussian(o, "A") for o in ("liver", "spleen", "pancreas", "stomach")]
    for m1, s1, _ in soft:
        for m2, s2, _ in soft:
            assert abs(m1 - m2) < s1 + s2
    for vessel in ("aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein"):
        assert priors.gaussian(vessel, "A")[0] > priors.gaussian("liver", "A")[0]
    # in both phases every organ has a look-alike among the other tissues: none is an intensity class of its own
    for domain in "AB":
        for organ in ORGANS.values():
            m, s, _ = priors.gaussian(organ, domain)
            others = [priors.gaussian(t, domain) for t in priors.tissues if t not in (organ, "air")]
            assert any(abs(m - m2) < s + s2 for m2, s2, _ in others), (organ, domain)


def test_bad_priors_file_gives_one_line(tmp_path):
    from nnunetv2_fseft.errors import FSEFTError
    from abdomen_synth.priors import load_priors
    data = json.loads(PRIORS_FILE.read_text())
    del data["tissues"]["liver"]["B"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FSEFTError, match="tissue 'liver' needs .* for domain 'B'"):
        load_priors(path)
    path.write_text("{")
    with pytest.raises(FSEFTError, match="not valid JSON"):
        load_priors(path)


def test_split_is_disjoint_and_complete():
    groups = SPLIT["pretraining"]["datasets"]
    pre = [s for g in groups.values() for s in g["subjects"]]
    target = SPLIT["target"]["supports"] + SPLIT["target"]["query"]
    assert len(groups) == 3 and all(len(g["subjects"]) == 6 for g in groups.values())
    assert len(set(pre)) == 18 and len(set(target)) == 12 and not set(pre) & set(target)
    assert len(SPLIT["target"]["supports"]) == 5 and len(SPLIT["target"]["query"]) == 7
    annotated = [set(g["organs"]) for g in groups.values()]
    assert len({frozenset(a) for a in annotated}) == 3
    assert sum("liver" in a for a in annotated) == 2  # unification by name matters
    assert set().union(*annotated) == set(SPLIT["known_organs"])
    assert not set(SPLIT["novel_organs"]) & set(SPLIT["known_organs"])
    assert set(SPLIT["novel_organs"]) | set(SPLIT["known_organs"]) == set(ORGANS.values())


@needs_real_data
def test_split_subjects_exist_and_target_subjects_have_every_organ():
    names = json.loads((REAL_LABELS / "labels.json").read_text())
    assert {int(k): v for k, v in names.items()} == ORGANS
    for subject in SPLIT["target"]["supports"] + SPLIT["target"]["query"]:
        counts = np.bincount(sitk.GetArrayFromImage(sitk.ReadImage(str(REAL_LABELS / f"{subject}.nii.gz"))).ravel(),
                             minlength=14)
        assert (counts[1:] > 0).all(), subject  # no empty organ in a support or query subject


# -------------------------------------------------------------------------------------------------- generator

@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("labels")
    return write_phantom_labels(folder, "p001")


def test_missing_torchio_is_one_line_naming_the_extra(monkeypatch):
    from nnunetv2_fseft.errors import FSEFTError
    from abdomen_synth import require_torchio
    monkeypatch.setitem(sys.modules, "torchio", None)
    with pytest.raises(FSEFTError, match=r'pip install -e "\.\[abdomen\]"'):
        require_torchio()


def test_generator_is_deterministic_for_subject_domain_and_seed(tio, priors, phantom):
    from abdomen_synth.ct import synthesize
    import torch
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)

    def image(domain="A", seed=0):
        return sitk.GetArrayFromImage(synthesize(phantom, ORGANS, priors, "p001", domain, seed, 8.0).image)
    first = image()
    assert torch.equal(torch.rand(1), before)  # the caller's torch random state is left alone
    assert np.array_equal(first, image())
    assert not np.array_equal(first, image(seed=1))
    other = image("B")
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_image_and_label_share_the_grid_and_keep_every_organ(tio, priors, phantom):
    from abdomen_synth.ct import synthesize
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom)))
    for domain, spacing in (("A", (4.0, 4.0, 4.0)), ("B", (4.0, 4.0, 5.0))):
        case = synthesize(phantom, ORGANS, priors, "p001", domain, 0, 4.0)
        for field in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert getattr(case.image, field)() == getattr(case.label, field)()
        assert case.image.GetSpacing() == spacing
        assert case.image.GetPixelID() == sitk.sitkInt16
        label = sitk.GetArrayFromImage(case.label)
        assert set(np.unique(label)) == set(np.unique(source))


def test_every_tissue_follows_its_prior_before_blur_and_noise(tio, priors, phantom):
    from abdomen_synth.ct import synthesize
    for domain in "AB":
        case = synthesize(phantom, ORGANS, priors, "p001", domain, 0, 4.0, keep_intermediate=True)
        tissues, names = case.tissue_map.tissues, case.tissue_map.names
        checked = set()
        for t in np.unique(tissues):
            values = case.clean_hu[tissues == t]
            if len(values) < 100:
                continue
            mean, std, jitter = priors.gaussian(names[t], domain)
            tolerance = jitter + 5 * std / np.sqrt(len(values)) + 0.5
            assert abs(values.mean() - mean) <= tolerance, (names[t], domain, values.mean(), mean)
            assert values.std() == pytest.approx(std, rel=0.15, abs=1.0), (names[t], domain)
            checked.add(case.tissue_map.kinds[t])
        assert {"liver", "spleen", "aorta", "fat", "muscle", "bone", "air"} <= checked
        assert any(k.startswith("lookalike:") for k in checked)  # unlabelled distractors from organ priors


def test_organ_interiors_keep_their_prior_after_the_whole_scanner_model(tio, priors, phantom):
    """Blur, shading and noise leave the mean of an organ's interior (eroded, away from partial volume) near its
    prior: the scanner model changes texture and edges, not the organ's HU."""
    from abdomen_synth.ct import synthesize
    case = synthesize(phantom, ORGANS, priors, "p001", "A", 0, 4.0)
    image, label = sitk.GetArrayFromImage(case.image), sitk.GetArrayFromImage(case.label)
    interior = ndimage.binary_erosion(label == 6, iterations=2)
    mean, std, jitter = priors.gaussian("liver", "A")
    assert interior.sum() > 50
    assert abs(image[interior].mean() - mean) < jitter + 15


def test_body_has_air_outside_and_fat_muscle_inside(tio, priors, phantom):
    from abdomen_synth.ct import synthesize
    case = synthesize(phantom, ORGANS, priors, "p001", "A", 0, 4.0, keep_intermediate=True)
    kinds = case.tissue_map.kinds
    tissues = case.tissue_map.tissues
    air = tissues == kinds.index("air")
    assert air[0, 0, 0] and air[-1, -1, -1]  # the field's corners
    organs = (tissues >= 1) & (tissues <= max(ORGANS))  # organ tissue ids are their label values
    assert not (ndimage.binary_dilation(organs, iterations=2) & air).any()  # a body all around the organs
    assert {"fat", "muscle", "bone", "stomach_content"} <= {kinds[t] for t in np.unique(tissues)}


def test_write_case_never_modifies_the_label_map_and_converts_with_the_plugin(tio, priors, phantom, tmp_path,
                                                                               nnunet_env):
    from nnunetv2_fseft.data.convert import convert_structures
    from nnunetv2_fseft.data.nnunet_raw import check_raw_dataset
    from abdomen_synth.ct import write_case
    digest, mtime = sha256(phantom), phantom.stat().st_mtime_ns
    folder = write_case(tmp_path / "A" / "p001", phantom, ORGANS, priors, "p001", "A", 0, 8.0)
    written = (folder / "ct.nii.gz").stat().st_mtime_ns
    assert write_case(folder, phantom, ORGANS, priors, "p001", "A", 0, 8.0) == folder  # same settings: kept
    assert (folder / "ct.nii.gz").stat().st_mtime_ns == written
    assert sha256(phantom) == digest and phantom.stat().st_mtime_ns == mtime
    masks = sorted(p.name for p in (folder / "segmentations").iterdir())
    assert masks == sorted(f"{o}.nii.gz" for o in ORGANS.values())
    assert json.loads((folder / "synth.json").read_text())["note"] == "real anatomy, synthetic intensities"
    target = convert_structures([folder], 951, "SynthCheck", structures=["liver", "spleen", "pancreas"])
    check_raw_dataset(target)


@needs_real_data
def test_real_label_maps_are_only_read(tio, priors, tmp_path):
    from abdomen_synth.ct import write_case
    source = REAL_LABELS / f"{SPLIT['target']['query'][0]}.nii.gz"
    digest, mtime = sha256(source), source.stat().st_mtime_ns
    folder = write_case(tmp_path / "case", source, ORGANS, priors, source.name[:4], "B", 0, 8.0)
    assert sha256(source) == digest and source.stat().st_mtime_ns == mtime
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels.nii.gz")))
    assert set(np.unique(label)) == set(range(14))


# ------------------------------------------------------------------------------------------- the data command

def _run_data_command(*args):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "abdomen_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_data_command_without_label_maps_is_one_line(tmp_path):
    result = _run_data_command(tmp_path / "work", "--labels", tmp_path / "nowhere")
    assert result.returncode != 0
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "abdomen_labels_l2r" in err, err


def test_data_command_refuses_existing_outputs(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "labels.json").write_text(json.dumps({str(k): v for k, v in ORGANS.items()}))
    for subject in [s for g in SPLIT["pretraining"]["datasets"].values() for s in g["subjects"]] + \
            SPLIT["target"]["supports"] + SPLIT["target"]["query"]:
        (labels / f"{subject}.nii.gz").touch()  # never read: the refusal comes first
    (tmp_path / "work" / "raw" / "Dataset801_AbdA_LiverSpleenStomach").mkdir(parents=True)
    result = _run_data_command(tmp_path / "work", "--labels", labels)
    err = result.stderr.strip()
    assert result.returncode != 0 and len(err.splitlines()) == 1, err
    assert "already exists" in err and "--overwrite" in err


# ---------------------------------------------------------------------------------- tiny end-to-end harness run

def tiny_abdomen(tmp_path, priors, dataset_id: int, nnunet_env) -> list:
    """Two subjects (real ones, coarsened, when ../shared/data is there; else phantoms) synthesised at 10 mm in
    domains A and B; domain A converted and planned as a tiny foundation dataset. Returns domain B's cases."""
    from nnunetv2_fseft.data.convert import convert_structures
    from nnunetv2_fseft.planning import plan_with_preset
    from abdomen_synth.ct import write_case
    if REAL_LABELS.is_dir():
        sources = [coarse_copy(REAL_LABELS / f"{s}.nii.gz", tmp_path / "labels") for s in SPLIT["target"]["query"][:2]]
    else:
        sources = [write_phantom_labels(tmp_path / "labels", s, shift) for s, shift in (("s001", 0), ("s002", 2))]
    subjects = [p.name[:-7] for p in sources]
    cases = {d: [write_case(tmp_path / "synth" / d / s, p, ORGANS, priors, s, d, 0, 10.0)
                 for s, p in zip(subjects, sources)] for d in "AB"}
    name = convert_structures(cases["A"], dataset_id, "AbdTinyFound", structures=["liver", "spleen", "stomach"])
    plan_with_preset(dataset_id, "tiny", num_processes=1)
    (nnunet_env / "pre" / Path(name).name / "splits_final.json").write_text(
        json.dumps([{"train": subjects, "val": subjects[:1]}]))
    return cases["B"]


def test_harness_runs_on_two_synthetic_subjects(tio, priors, nnunet_env, tmp_path):
    """Two subjects (real ones, coarsened, when ../shared/data is there; else phantoms) at 10 mm: a foundation on
    domain A (liver, spleen, stomach), a target in domain B with a known and a novel organ, one support and one
    query, the zero-shot baseline and a 3-iteration linear probe through nnUNetv2_fseft_benchmark (trainers in
    tests/ext/abdomen_test_trainers.py: a 10-iteration foundation, no mirroring)."""
    import torch
    from nnunetv2.run.run_training import run_training
    from nnunetv2_fseft.benchmark.config import load_config
    from nnunetv2_fseft.benchmark.runner import run_benchmark
    from nnunetv2_fseft.data.convert import convert_structures
    from phantom_world import model_folder
    cases_b = tiny_abdomen(tmp_path, priors, 961, nnunet_env)
    convert_structures(cases_b, 962, "AbdTinyTarget", structures=["liver", "pancreas"])
    run_training("961", "3d_fullres", 0, "nnUNetTrainer_abdtest", device=torch.device("cpu"))
    found = model_folder(nnunet_env, "Dataset961_AbdTinyFound", "nnUNetTrainer_abdtest")
    config = tmp_path / "bench.json"
    config.write_text(json.dumps({"dataset": 962, "foundation": str(found), "k": [1], "seeds": [0], "query": 1,
                                  "methods": ["zeroshot", "FSEFTLinearProbeTrainer_abdtest"], "output": "out"}))
    result = run_benchmark(load_config(config), progress=False)
    records = {r["method"]: r for r in result["records"]}
    assert set(records) == {"zeroshot", "FSEFTLinearProbeTrainer_abdtest"}
    for r in records.values():
        assert set(r["dice_per_class"]) == {"liver", "pancreas"}
    assert records["zeroshot"]["dice_per_class"]["pancreas"] == 0  # a novel organ is never predicted zero-shot
    assert (tmp_path / "out" / "results.md").is_file() and (tmp_path / "out" / "dice_vs_k.png").is_file()


def test_seeded_pretraining_rebuilds_the_same_foundation(tio, priors, nnunet_env, tmp_path, monkeypatch):
    """The driver pre-trains with abdomen.PRETRAIN_ENV (a seed, augmentation in the training process), so that a
    lost work folder rebuilds the foundation the committed cells were measured on: two seeded runs of a tiny
    pre-training end with identical weights; an unseeded run does not (the comparison can see a difference)."""
    import torch
    from nnunetv2.run.run_training import run_training
    from nnunetv2_fseft.checkpoints import weights_sha256
    from phantom_world import model_folder
    import abdomen
    tiny_abdomen(tmp_path, priors, 963, nnunet_env)
    checkpoint = model_folder(nnunet_env, "Dataset963_AbdTinyFound", "nnUNetTrainer_abdseeded") / "fold_0" / \
        "checkpoint_final.pth"
    weights, digests = [], []
    for seeded in (True, True, False):
        for key, value in abdomen.PRETRAIN_ENV.items():
            monkeypatch.setenv(key, value)
        if not seeded:
            monkeypatch.delenv("nnUNet_fseft_seed")
        run_training("963", "3d_fullres", 0, "nnUNetTrainer_abdseeded", device=torch.device("cpu"))
        weights.append(torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"])
        digests.append(weights_sha256(checkpoint))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert digests[0] == digests[1] != digests[2]  # what the tables print to tell foundations apart


# ------------------------------------------------------------------------------------------ the driver's tables

def test_tables_and_plots_say_real_anatomy_synthetic_intensities(tmp_path):
    import abdomen
    organs = list(SPLIT["known_organs"])
    exp1 = [{"model": m, "trainer": "T", "dataset": "D", "dice_per_class": {o: 0.5 for o in organs}, "dice": 0.5,
             "train_seconds": 60.0} for m in ("multitalent", "naive", "upper")]
    exp1[0]["dice_per_class_sigmoid"] = {o: 0.75 for o in organs}
    abdomen.write_experiment1(tmp_path, exp1, "python benchmarks/abdomen.py W --experiment 1")
    exp1_table = (tmp_path / "abdomen_exp1_cpu.md").read_text()
    rows = tables(exp1_table)[0]
    assert row(rows, model="multitalent", scoring="label map")["mean"] == "0.500"
    assert row(rows, model="multitalent", scoring="each sigmoid > 0.5")["mean"] == "0.750"
    cells = [{"method": m, "k": k, "seed": s, "fold": 0, "dice": 0.4, "dice_per_class": {"pancreas": 0.4}}
             for m in ("scratch", "FSEFTLoRATrainer_abd") for k in (1, 5) for s in (0, 1)]
    abdomen.publish(tmp_path, 3, cells, abdomen.NOVEL_B, "python benchmarks/abdomen.py W --experiment 3",
                    "Foundation: F, network-weights sha256 0123.")
    for n in (1, 3):
        table = (tmp_path / f"abdomen_exp{n}_cpu.md").read_text()
        assert "real anatomy, synthetic intensities" in table.splitlines()[0]
        assert f"--experiment {n}" in table
        assert (tmp_path / f"abdomen_exp{n}_cpu.png").stat().st_size > 0
        assert (tmp_path / f"abdomen_exp{n}_cpu.csv").read_text().count("\n") > 1
    exp3_table = (tmp_path / "abdomen_exp3_cpu.md").read_text()
    assert "0.400 ± 0.000" in exp3_table  # mean ± std over seeds
    assert "Foundation: F, network-weights sha256 0123." in exp3_table  # cells of two foundations never mix


def test_sigmoid_scoring_keeps_a_class_the_label_map_overwrites(tmp_path):
    """Two sigmoids firing on one kidney: the label map keeps the later class, per-class scoring keeps both."""
    import numpy as np
    import SimpleITK as sitk
    import abdomen
    truth = np.zeros((4, 4, 8), np.uint8)
    truth[:, :, :4], truth[:, :, 4:] = 4, 5  # right kidney, left kidney
    probabilities = np.zeros((2, 4, 4, 8), np.float32)
    probabilities[0][truth == 4] = 0.9       # kidney_right: exactly the right kidney
    probabilities[1] = 0.9                   # kidney_left: fires on both kidneys
    (tmp_path / "truth").mkdir()
    for s in abdomen.QUERY_A.subjects:
        np.savez(tmp_path / f"{s}.npz", probabilities=probabilities)
        sitk.WriteImage(sitk.GetImageFromArray(truth), str(tmp_path / "truth" / f"{s}.nii.gz"))
    dice = abdomen.sigmoid_dice(tmp_path, tmp_path / "truth", {"kidney_right": [4, 4], "kidney_left": [5, 5]},
                                {"kidney_right": 4, "kidney_left": 5})
    assert dice["kidney_right"] == 1.0 and abs(dice["kidney_left"] - 2 * 64 / (128 + 64)) < 1e-6


def test_experiment1_keeps_finished_records_and_rescores_only_those_without_sigmoid_scores(tmp_path, monkeypatch):
    """A re-run must not train again: complete records are kept as they are; a record written before per-sigmoid
    scoring existed is scored again and keeps its training time."""
    import abdomen
    organs = list(SPLIT["known_organs"])
    (tmp_path / "exp1").mkdir()
    for m in ("naive", "upper"):
        (tmp_path / "exp1" / f"{m}.json").write_text(json.dumps(
            {"model": m, "trainer": "T", "dataset": "D", "dice_per_class": {o: 0.5 for o in organs}, "dice": 0.5,
             "train_seconds": 60.0, "dice_per_class_sigmoid": None,
             **({"measured": "2026-11-23, restored"} if m == "upper" else {})}))
    (tmp_path / "exp1" / "multitalent.json").write_text(json.dumps(
        {"model": "multitalent", "trainer": "T", "dataset": "D", "dice_per_class": {o: 0.1 for o in organs},
         "dice": 0.1, "train_seconds": 90.0}))

    def no_training(*args):
        raise AssertionError("a finished model was trained again")
    scored = []

    def fake_score(work, model, name, device):
        scored.append(name)
        return {o: 0.2 for o in organs}, {o: 0.3 for o in organs}
    monkeypatch.setattr(abdomen, "train", no_training)
    monkeypatch.setattr(abdomen, "plan_pretraining", no_training)
    monkeypatch.setattr(abdomen, "predict_and_score", fake_score)
    abdomen.experiment1(tmp_path, tmp_path / "results", "cmd", "cpu")
    assert scored == ["multitalent"]
    record = json.loads((tmp_path / "exp1" / "multitalent.json").read_text())
    assert record["train_seconds"] == 90.0 and record["dice_per_class_sigmoid"] == {o: 0.3 for o in organs}
    table = (tmp_path / "results" / "abdomen_exp1_cpu.md").read_text()
    assert row(tables(table)[0], model="naive", scoring="label map")["mean"] == "0.500"
    assert "- upper: 2026-11-23, restored" in table  # a row from an earlier run says so
