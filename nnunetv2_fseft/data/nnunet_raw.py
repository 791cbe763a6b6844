"""Reading and writing nnU-Net raw datasets (dataset.json, imagesTr/labelsTr, geometry). No torch here.

Everything that writes goes through `staged_output`: the new dataset is built in a hidden folder next to
its final place and renamed only when complete, so an error never leaves half a dataset behind, and the
sources are only ever read (images are linked, label maps are written anew).
"""
import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.files import read_json, write_json

# Formats SimpleITK reads and writes with geometry; nnU-Net's other readers (png, tif) are out of scope.
SITK_FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl")


def raw_root() -> Path:
    value = os.environ.get("nnUNet_raw")
    if not value:
        raise FSEFTError("nnUNet_raw is not set; fix: export nnUNet_raw=/path/to/nnUNet_raw")
    root = Path(value)
    if not root.is_dir():
        raise FSEFTError(f"nnUNet_raw={root} is not a folder; fix: create it or point nnUNet_raw elsewhere")
    return root


def resolve_dataset(name_or_id) -> Path:
    """Dataset id (11, '011') or name ('Dataset011_Liver') -> its raw folder, via nnU-Net's own lookup."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    root = raw_root()
    try:
        name = maybe_convert_to_dataset_name(name_or_id)
    except ValueError:
        raise FSEFTError(f"cannot find dataset '{name_or_id}': neither an id nor a DatasetXXX_Name; "
                         f"fix: pass e.g. 11 or Dataset011_Liver") from None
    except RuntimeError as e:
        if str(e).startswith("More than one"):  # nnU-Net's own wording for ambiguous ids
            raise FSEFTError(f"cannot use dataset '{name_or_id}': its id has several names across nnUNet_raw, "
                             f"nnUNet_preprocessed and nnUNet_results; fix: remove or rename the stale "
                             f"folders") from None
        raise FSEFTError(f"cannot find dataset '{name_or_id}': no such id in nnUNet_raw={root}; "
                         f"fix: check the id (ls $nnUNet_raw) or pass DatasetXXX_Name") from None
    folder = root / name
    if not folder.is_dir():
        raise FSEFTError(f"dataset '{name_or_id}' ({name}) is not in nnUNet_raw={root}; "
                         f"fix: convert it to nnU-Net raw format there first")
    return folder


def load_dataset_json(folder: Path) -> dict:
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        raise FSEFTError(f"{folder} has no dataset.json; fix: point at an nnU-Net raw dataset folder "
                         f"(imagesTr/, labelsTr/, dataset.json)")
    dataset_json = read_json(path, "fix: repair the file")
    if not isinstance(dataset_json, dict):
        raise FSEFTError(f"{path} is not a JSON object; fix: write it as nnU-Net's dataset_format.md shows")
    for key in ("channel_names", "labels", "file_ending"):
        if key not in dataset_json:
            raise FSEFTError(f"{path} has no '{key}'; fix: add it (see nnU-Net's dataset_format.md)")
    check_labels(dataset_json, str(path))
    return dataset_json


def check_labels(dataset_json: dict, where: str):
    """nnU-Net's rules for "labels": background 0, values (regions flattened) consecutive from 0, and an
    ignore label, if any, right after the highest value. Checked up front, with the fix, instead of deep
    inside nnU-Net's planning."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise FSEFTError(f"{where}: \"labels\" must map names to values, e.g. {{\"background\": 0, \"liver\": 1}}")
    if labels.get("background") != 0:
        raise FSEFTError(f"{where}: labels need \"background\": 0; fix: add it (nnU-Net requires label 0 = background)")
    values, seen = set(), {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise FSEFTError(f"{where}: label '{name}' has value {value!r}; fix: use integers >= 0")
            if not isinstance(value, (list, tuple)) and v in seen:
                raise FSEFTError(f"{where}: labels '{seen[v]}' and '{name}' both have value {v}; "
                                 f"fix: give each label its own value")
            seen.setdefault(v, name)
            values.add(v)
    gaps = sorted(set(range(max(values) + 1)) - values)
    if gaps:
        raise FSEFTError(f"{where}: label values must be consecutive (0, 1, 2, ...) but {gaps[:5]} is missing "
                         f"(values: {sorted(values)}); fix: renumber the labels, in dataset.json and in the label "
                         f"maps (nnUNetv2_fseft_convert relabel does both)")
    if "ignore" in labels and labels["ignore"] != max(values) + 1:
        raise FSEFTError(f"{where}: the ignore label must be {max(values) + 1} (highest label + 1), "
                         f"not {labels['ignore']!r}; fix: renumber it")


def integer_labels(dataset_json: dict, where: str) -> Dict[str, int]:
    """name -> value for a source dataset. Region or ignore labels have no per-class voxels to remap."""
    labels = {}
    for name, value in dataset_json["labels"].items():
        if isinstance(value, (list, tuple)):
            raise FSEFTError(f"{where}: label '{name}' is a region {value}; fix: use a source dataset with "
                             f"integer labels (region datasets cannot be relabelled or assembled)")
        if name == "ignore":
            raise FSEFTError(f"{where}: has an 'ignore' label; fix: remove it (ignore labels are not supported "
                             f"by conversion/assembly)")
        labels[name] = int(value)
    if labels.get("background") != 0:
        raise FSEFTError(f"{where}: dataset.json labels need \"background\": 0")
    return labels


def check_file_ending(file_ending: str, where: str):
    if file_ending not in SITK_FILE_ENDINGS:
        raise FSEFTError(f"{where}: file_ending '{file_ending}' is not supported; "
                         f"fix: use one of {', '.join(SITK_FILE_ENDINGS)}")


def training_cases(folder: Path, dataset_json: dict) -> Dict[str, Tuple[List[Path], Path]]:
    """case id -> (image files in channel order, label file), like nnU-Net's
    get_filenames_of_train_images_and_targets but without its 12-process pool."""
    folder = Path(folder)
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    if "dataset" in dataset_json:  # explicit file lists, paths relative to the dataset folder
        cases = {k: ([folder / os.path.expandvars(i) for i in v["images"]], folder / os.path.expandvars(v["label"]))
                 for k, v in dataset_json["dataset"].items()}
    else:
        labels_dir = folder / "labelsTr"
        if not labels_dir.is_dir():
            raise FSEFTError(f"{folder} has no labelsTr/; fix: point at an nnU-Net raw dataset folder")
        cases = {}
        for label in sorted(labels_dir.iterdir()):
            if label.name.endswith(ending) and not label.name.startswith("."):
                case = label.name[: -len(ending)]
                cases[case] = ([folder / "imagesTr" / f"{case}_{c:04d}{ending}" for c in range(n_channels)], label)
    if not cases:
        raise FSEFTError(f"{folder}/labelsTr has no '*{ending}' files; fix: check file_ending in dataset.json")
    for case, (images, _) in cases.items():
        for image in images:
            if not image.is_file():
                raise FSEFTError(f"case '{case}' of {folder.name}: image {image.name} is missing; "
                                 f"fix: every case needs one image per channel in imagesTr/")
    return cases


def check_raw_dataset(folder: Path) -> dict:
    """What nnU-Net's verify_dataset_integrity checks, as one line naming the case and the fix, before
    planning starts: dataset.json, numTraining, files per case, readable images, image/label geometry and
    label values declared in dataset.json. Returns dataset.json."""
    folder = Path(folder)
    dataset_json = load_dataset_json(folder)
    cases = training_cases(folder, dataset_json)
    n = dataset_json.get("numTraining")
    if n is not None and n != len(cases):
        raise FSEFTError(f"{folder / 'dataset.json'}: numTraining is {n} but there are {len(cases)} training "
                         f"cases; fix: set \"numTraining\": {len(cases)}")
    if dataset_json["file_ending"] not in SITK_FILE_ENDINGS:
        return dataset_json  # png/tif readers: nnU-Net's own check covers them
    labels = dataset_json["labels"]
    declared = {v for value in labels.values() for v in (value if isinstance(value, (list, tuple)) else [value])}
    for case, (images, label) in cases.items():
        geometry = Geometry.of_file(images[0])
        if 0 in geometry.size:
            raise FSEFTError(f"case '{case}': image {images[0].name} has no voxels (size {geometry.size}); "
                             f"fix: re-export the image or remove the case")
        for image in images[1:]:
            check_geometry(case, geometry, Geometry.of_file(image), f"image {image.name}", f"image {images[0].name}")
        label_image = read_image(label)
        check_geometry(case, geometry, Geometry.of_image(label_image), f"label {label.name}", f"image {images[0].name}")
        unknown = sorted(set(np.unique(sitk.GetArrayViewFromImage(label_image)).tolist()) - declared)
        if unknown:
            raise FSEFTError(f"case '{case}': label {label.name} has values {unknown[:5]} that dataset.json does "
                             f"not declare (declared: {sorted(declared)}); fix: add them to dataset.json labels "
                             f"or clean the label map")
    return dataset_json


class Geometry(NamedTuple):
    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    @classmethod
    def of_image(cls, image: sitk.Image) -> "Geometry":
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    @classmethod
    def of_file(cls, path: Path) -> "Geometry":
        """Header only: CT volumes are not decompressed just to learn their grid."""
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise FSEFTError(_unreadable(path)) from None
        return cls(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())

    def difference(self, other: "Geometry") -> Optional[Tuple[str, str, str]]:
        """None when equal, else (field, self's value, other's value). Tolerances are nnU-Net's own
        (np.allclose in verify_dataset_integrity), so what passes here passes there."""
        if tuple(self.size) != tuple(other.size):
            return "size", str(tuple(self.size)), str(tuple(other.size))
        for field in ("spacing", "origin", "direction"):
            a, b = getattr(self, field), getattr(other, field)
            if not np.allclose(a, b):
                return field, _fmt(a), _fmt(b)
        return None

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def _unreadable(path) -> str:
    path = Path(path)
    what = "is empty (0 bytes)" if path.is_file() and path.stat().st_size == 0 else "is not a readable image"
    return f"cannot read {path}: the file {what}; fix: re-export or replace it (e.g. a truncated copy or download)"


def read_image(path) -> sitk.Image:
    """sitk.ReadImage with one clear line for empty, truncated or foreign files."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise FSEFTError(_unreadable(path)) from None


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def check_geometry(case: str, image_geometry: Geometry, other: Geometry, other_name: str, image_name: str):
    diff = image_geometry.difference(other)
    if diff:
        field, image_value, other_value = diff
        raise FSEFTError(f"case '{case}': {other_name} has {field} {other_value} but {image_name} has "
                         f"{image_value}; fix: resample {other_name} onto the image grid")


def write_label_map(array: np.ndarray, geometry: Geometry, path: Path):
    """Label map with the image's geometry (nnU-Net checks that they agree)."""
    dtype = np.uint8 if array.max(initial=0) < 256 else np.uint16
    image = geometry.apply_to(sitk.GetImageFromArray(array.astype(dtype, copy=False)))
    sitk.WriteImage(image, str(path), useCompression=True)


def link_file(src: Path, dst: Path):
    """Hardlink, else symlink, else copy: images are never rewritten. A link *is* the source file, so
    nothing here ever opens dst for writing (nor does nnU-Net, which only reads nnUNet_raw)."""
    src = Path(os.path.realpath(src))
    for link in (os.link, os.symlink):
        try:
            return link(src, dst)
        except OSError:  # other file system, a file we do not own (fs.protected_hardlinks), no symlinks
            continue
    shutil.copy2(src, dst)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise FSEFTError(f"dataset id {dataset_id!r} is invalid; fix: use an integer from 1 to 999")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", str(name)):
        raise FSEFTError(f"dataset name {name!r} is invalid; fix: use letters, digits, '_' or '-' (no spaces)")
    return f"Dataset{dataset_id:03d}_{name}"


def dataset_folder(dataset_id: int, name: str) -> Path:
    return raw_root() / dataset_folder_name(dataset_id, name)


@contextlib.contextmanager
def staged_output(dataset_id: int, name: str, overwrite: bool, source_folders: Sequence[Path] = ()):
    """Yield a hidden staging folder; on success it replaces nnUNet_raw/DatasetXXX_Name."""
    target = dataset_folder(dataset_id, name)
    root, folder_name = target.parent, target.name
    for src in source_folders:
        if Path(src).name.startswith(f"Dataset{dataset_id:03d}_"):
            raise FSEFTError(f"output id {dataset_id} is the id of source {Path(src).name}; "
                             f"fix: choose a new dataset id (sources are never overwritten)")
    _refuse_id_clash(dataset_id, folder_name)
    if target.exists() and not overwrite:
        raise FSEFTError(f"{target} already exists; fix: pass --overwrite (overwrite=True) to replace it, "
                         f"or choose another dataset id")
    staging = root / f".{folder_name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "imagesTr").mkdir(parents=True)
    (staging / "labelsTr").mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)  # unlinks hardlinks/symlinks only; the sources they point to stay as they were
    staging.rename(target)


def _refuse_id_clash(dataset_id: int, folder_name: str):
    """nnU-Net refuses ids with two names anywhere in raw/preprocessed/results ('More than one dataset name')."""
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets
    others = [c for c in find_candidate_datasets(dataset_id) if c != folder_name]
    if others:
        raise FSEFTError(f"dataset id {dataset_id} is already used by {others[0]}; "
                         f"fix: choose another id or remove {others[0]}")


def write_dataset_json(folder: Path, dataset_json: dict):
    write_json(Path(folder) / "dataset.json", dataset_json)


def remap_label_file(case: str, images: List[Path], label: Path, lut: Dict[int, int], out_label: Path) -> set:
    """Rewrite one source label map through lut (old value -> new value) onto the image's grid and return
    the new values present. Values the source dataset.json does not declare are an error, not background."""
    geometry = Geometry.of_file(images[0])
    label_image = read_image(label)
    check_geometry(case, geometry, Geometry.of_image(label_image), f"label {label.name}", f"image {images[0].name}")
    array = sitk.GetArrayFromImage(label_image)
    values = np.unique(array)
    unknown = [v for v in values.tolist() if v not in lut]
    if unknown:
        raise FSEFTError(f"case '{case}': label {label.name} has values {unknown[:5]} that dataset.json does not "
                         f"declare (declared: {sorted(lut)}); fix: add them to dataset.json labels or clean the map")
    table = np.zeros(max(lut) + 1, dtype=np.uint16)
    for old, new in lut.items():
        table[old] = new
    remapped = table[array.astype(np.int64)]
    write_label_map(remapped, geometry, out_label)
    return {int(table[int(v)]) for v in values} - {0}
