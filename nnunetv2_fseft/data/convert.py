"""Build nnU-Net raw datasets: from per-structure masks (TotalSegmentator layout) or from another raw
dataset with a subset / renaming / merging of its labels. No torch here."""
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_fseft.data.nnunet_raw import (
    Geometry, check_file_ending, check_geometry, dataset_folder, integer_labels, link_file, load_dataset_json, read_image,
    remap_label_file,
    resolve_dataset, staged_output, training_cases, write_dataset_json, write_label_map)
from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.names import normalize_class_name

IMAGE_NAME = "ct.nii.gz"
MASK_FOLDER = "segmentations"
MASK_ENDING = ".nii.gz"


# ----------------------------------------------------------------------------------------------------------
# per-structure layout: CASE/ct.nii.gz + CASE/segmentations/<structure>.nii.gz
# ----------------------------------------------------------------------------------------------------------

def find_structure_cases(inputs: Sequence[Union[str, Path]]) -> Dict[str, Path]:
    """Each input is a case folder (has ct.nii.gz) or a folder of case folders. Case id = folder name."""
    cases = {}
    for given in inputs:
        given = Path(given)
        if (given / IMAGE_NAME).is_file():
            found = [given]
        elif given.is_dir():
            found = sorted(d for d in given.iterdir() if (d / IMAGE_NAME).is_file())
        else:
            raise FSEFTError(f"input {given} does not exist; fix: give case folders (CASE/{IMAGE_NAME} + "
                             f"CASE/{MASK_FOLDER}/) or a folder containing them")
        if not found:
            raise FSEFTError(f"no case folders under {given}; fix: each case needs CASE/{IMAGE_NAME} and "
                             f"CASE/{MASK_FOLDER}/<structure>{MASK_ENDING}")
        for case_dir in found:
            if case_dir.name in cases:
                raise FSEFTError(f"case id '{case_dir.name}' occurs twice ({cases[case_dir.name]} and {case_dir}); "
                                 f"fix: rename one case folder")
            if not (case_dir / MASK_FOLDER).is_dir():
                raise FSEFTError(f"case '{case_dir.name}' has no {MASK_FOLDER}/ folder; fix: put one "
                                 f"<structure>{MASK_ENDING} mask per structure in {case_dir / MASK_FOLDER}")
            cases[case_dir.name] = case_dir
    return cases


def _structure_files(case_dir: Path) -> Dict[str, Path]:
    return {p.name[: -len(MASK_ENDING)]: p for p in sorted((case_dir / MASK_FOLDER).glob(f"*{MASK_ENDING}"))}


def _resolve_names(requested: Sequence[str], available: Sequence[str], what: str, where: str = "") -> List[str]:
    """Match user-typed names to available ones (case, '_', ' ', '-' insensitive), keeping the user's order."""
    by_norm = {normalize_class_name(a): a for a in available}
    resolved = []
    for name in requested:
        match = by_norm.get(normalize_class_name(name))
        if match is None:
            raise FSEFTError(f"unknown {what} '{name}'{where}; available: {', '.join(available)}")
        if match not in resolved:
            resolved.append(match)
    return resolved


def _read_mask(case: str, path: Path, geometry: Geometry) -> np.ndarray:
    mask = read_image(path)
    check_geometry(case, geometry, Geometry.of_image(mask), f"mask {MASK_FOLDER}/{path.name}", IMAGE_NAME)
    array = sitk.GetArrayFromImage(mask)
    bad = (array != 0) & (array != 1)
    if bad.any():
        raise FSEFTError(f"case '{case}': mask {MASK_FOLDER}/{path.name} is not binary (values "
                         f"{np.unique(array[bad])[:5].tolist()}); fix: save it with 0 = outside, 1 = inside")
    return array.astype(bool)


def _nonempty_structures(cases: Dict[str, Path], names: Sequence[str]) -> List[str]:
    keep = set()
    for case, case_dir in tqdm(cases.items(), desc="scanning masks", unit="case", disable=None):
        for name, path in _structure_files(case_dir).items():
            if name not in keep and sitk.GetArrayFromImage(read_image(path)).any():
                keep.add(name)
    return [n for n in names if n in keep]


def convert_structures(inputs: Sequence[Union[str, Path]], dataset_id: int, name: str,
                       structures: Optional[Sequence[str]] = None, priority: Optional[Sequence[str]] = None,
                       overwrite: bool = False) -> Path:
    """Per-structure masks -> $nnUNet_raw/DatasetXXX_Name. Label values follow `structures` (default: every
    structure non-empty in at least one case, alphabetically). Overlaps are errors unless one of the two
    structures is in `priority` (earlier entries win; listed structures win over unlisted ones)."""
    cases = find_structure_cases(inputs)
    files = {case: _structure_files(case_dir) for case, case_dir in cases.items()}
    available = sorted(set().union(*files.values()))
    if not available:
        raise FSEFTError(f"no {MASK_FOLDER}/*{MASK_ENDING} masks in any case; fix: add one mask per structure")
    if structures:
        structures = _resolve_names(structures, available, "structure")
    else:
        structures = _nonempty_structures(cases, available)
        if not structures:
            raise FSEFTError("every mask is empty; fix: check the masks or name --structures explicitly")
    priority = _resolve_names(priority or [], structures, "--priority structure", " (not among the structures)")
    for case, found in files.items():
        missing = [s for s in structures if s not in found]
        if missing:
            raise FSEFTError(f"case '{case}' has no {MASK_FOLDER}/{missing[0]}{MASK_ENDING}; fix: add the mask "
                             f"(all zeros if absent from the scan) or pass --structures without "
                             f"'{missing[0]}' (only structures every case has)")

    value = {s: i + 1 for i, s in enumerate(structures)}
    # Paint low priority first so that higher-priority structures overwrite it; unlisted ones go first.
    paint_order = [s for s in structures if s not in priority] + priority[::-1]
    empty: Dict[str, List[str]] = {}
    resolved_overlaps: Dict[tuple, int] = {}
    with staged_output(dataset_id, name, overwrite) as out:
        for case, case_dir in tqdm(cases.items(), desc="converting", unit="case", disable=None):
            geometry = Geometry.of_file(case_dir / IMAGE_NAME)
            labels = np.zeros(geometry.size[::-1], dtype=np.uint16)
            for s in paint_order:
                mask = _read_mask(case, files[case][s], geometry)
                if not mask.any():
                    empty.setdefault(case, []).append(s)
                    continue
                under = labels[mask]
                for other_value, n in zip(*np.unique(under[under > 0], return_counts=True)):
                    other = structures[other_value - 1]
                    # Listed structures are painted last, lowest priority first: if s is listed it outranks
                    # whatever lies under it; if not, neither s nor `other` is listed and nothing decides.
                    if s not in priority:
                        raise FSEFTError(f"case '{case}': masks '{other}' and '{s}' overlap in {n} voxels; fix: "
                                         f"pass --priority with the structure that should win first, "
                                         f"e.g. --priority {s} {other}")
                    resolved_overlaps[(s, other)] = resolved_overlaps.get((s, other), 0) + int(n)
                labels[mask] = value[s]
            write_label_map(labels, geometry, out / "labelsTr" / f"{case}{MASK_ENDING}")
            link_file(case_dir / IMAGE_NAME, out / "imagesTr" / f"{case}_0000{MASK_ENDING}")
        write_dataset_json(out, {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, **value},
            "numTraining": len(cases),
            "file_ending": MASK_ENDING,
            "name": name,
        })
    target = dataset_folder(dataset_id, name)
    _print_summary(target, len(cases), structures, empty, resolved_overlaps)
    return target


def _print_summary(target: Path, n_cases: int, structures, empty, resolved_overlaps):
    print(f"wrote {target}: {n_cases} cases, {len(structures)} labels ({', '.join(structures)})")
    for case, names in empty.items():
        names = sorted(names, key=structures.index)
        print(f"  empty masks (structure not in the scan, labelled background) in '{case}': {', '.join(names)}")
    for (winner, loser), n in resolved_overlaps.items():
        print(f"  overlap resolved by --priority: '{winner}' over '{loser}' in {n} voxels")


# ----------------------------------------------------------------------------------------------------------
# raw dataset -> raw dataset with a subset / renaming / merging of labels
# ----------------------------------------------------------------------------------------------------------

def parse_label_spec(tokens: Sequence[str], option: str = "--labels") -> Dict[str, List[str]]:
    """['liver=liver,liver_tumor', 'spleen=spleen'] -> {'liver': ['liver', 'liver_tumor'], 'spleen': ['spleen']}"""
    spec = {}
    for token in tokens:
        new, sep, olds = token.partition("=")
        old_names = [o.strip() for o in olds.split(",") if o.strip()]
        if not sep or not new.strip() or not old_names:
            example = "liver=liver_tumor" if option == "--contains" else "kidney=kidney_left,kidney_right"
            raise FSEFTError(f"{option} entry '{token}' is malformed; fix: write NAME=NAME[,NAME...], "
                             f"e.g. {example}")
        if new.strip() in spec:
            raise FSEFTError(f"{option} names '{new.strip()}' twice; fix: list all its parts in one entry")
        spec[new.strip()] = old_names
    return spec


def relabel_dataset(source: Union[int, str, Path], dataset_id: int, name: str,
                    labels: Mapping[str, Sequence[str]], overwrite: bool = False) -> Path:
    """New dataset whose label k+1 is the union of the old labels listed for the k-th new name; unlisted old
    labels become background. Images are linked, label maps are remapped."""
    is_path = isinstance(source, Path) or "/" in str(source) or os.sep in str(source)
    folder = Path(source) if is_path else resolve_dataset(source)
    dataset_json = load_dataset_json(folder)
    old = integer_labels(dataset_json, folder.name)
    check_file_ending(dataset_json["file_ending"], folder.name)
    if "fseft_cases" in dataset_json:
        raise FSEFTError(f"{folder.name} is an assembled dataset (fseft_cases); fix: relabel its source datasets "
                         f"and assemble again, so that per-case annotations stay correct")
    if not labels:
        raise FSEFTError("no labels given; fix: pass e.g. --labels spleen=spleen")
    available = [n for n in old if n != "background"]
    lut = {v: 0 for v in old.values()}
    owner = {}
    for new_value, (new_name, old_names) in enumerate(labels.items(), start=1):
        for old_name in _resolve_names(list(old_names), available, "label", f" in {folder.name}"):
            if old_name in owner:
                raise FSEFTError(f"old label '{old_name}' is used by both '{owner[old_name]}' and '{new_name}'; "
                                 f"fix: give each old label to one new label")
            owner[old_name] = new_name
            lut[old[old_name]] = new_value
    cases = training_cases(folder, dataset_json)
    ending = dataset_json["file_ending"]
    present = {v: 0 for v in range(1, len(labels) + 1)}
    with staged_output(dataset_id, name, overwrite, source_folders=[folder]) as out:
        for case, (images, label) in tqdm(cases.items(), desc="relabelling", unit="case", disable=None):
            for v in remap_label_file(case, images, label, lut, out / "labelsTr" / f"{case}{ending}"):
                present[v] += 1
            for c, image in enumerate(images):
                link_file(image, out / "imagesTr" / f"{case}_{c:04d}{ending}")
        new_json = {"channel_names": dataset_json["channel_names"],
                    "labels": {"background": 0, **{n: i for i, n in enumerate(labels, start=1)}},
                    "numTraining": len(cases), "file_ending": ending, "name": name}
        # keep the rest (description, reader/writer overrides); "dataset" lists source paths, so it must go
        new_json.update({k: v for k, v in dataset_json.items() if k not in new_json and k != "dataset"})
        write_dataset_json(out, new_json)
    target = dataset_folder(dataset_id, name)
    print(f"wrote {target}: {len(cases)} cases from {folder.name}")
    for (new_name, old_names), v in zip(labels.items(), present):
        print(f"  {v} {new_name} <- {', '.join(old_names)}: non-empty in {present[v]}/{len(cases)} cases")
    return target
