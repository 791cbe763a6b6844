"""K-shot support/query splits written as nnU-Net's own splits_final.json (no torch in this module).

One nnU-Net fold = one (K, seed) few-shot experiment:
  train = the K support cases of that seed, val = one fixed query set shared by every fold.
Folds are numbered "for K in sorted(ks): for seed in seeds"; asking later for more K or seeds appends their
folds after the earlier ones, so a trained fold keeps its (K, seed). Supports are nested per seed
(the K=1 case is the first of the K=5 cases, which are the first five of the K=10 cases), so a
larger K only adds cases, as in the FSEFT protocol. The fold <-> (K, seed) table is saved next to
splits_final.json as fewshot_splits.json; that file is also how we recognise our own splits.

How nnU-Net reads the result (nnUNetTrainer.do_split, 2.8.1): it uses splits_final.json as is,
fold f -> splits[f]["train"], splits[f]["val"]; a fold >= len(splits) silently becomes a random
80:20 split, so only train the folds printed in the table. nnU-Net's planner copies a
$nnUNet_raw/DatasetXXX/splits_final.json over a missing preprocessed one and asserts that an existing one
matches it, so re-planning fails if such a raw file disagrees with these splits. Preprocessing leaves
splits_final.json alone.
"""
import os
import shutil
import sys

import numpy as np

from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.files import read_json, write_json
from nnunetv2_fseft.names import foreground_label_names, normalize_class_name

SPLITS_FILE = "splits_final.json"
TABLE_FILE = "fewshot_splits.json"
BACKUP_SUFFIX = ".before_fewshot"  # a foreign splits_final.json replaced with --overwrite is kept here
QUERY_SEED = 12345  # the query set is drawn once, independently of the support seeds
_NOT_CONFIG_DIRS = {"gt_segmentations"}


class EarlierFoldsChanged(FSEFTError):
    """New splits would give an earlier fold other supports or another query set (keep_earlier=True)."""


def _warn(message: str) -> None:
    print(f"nnunetv2_fseft: warning: {message}", file=sys.stderr)


def resolve_dataset(dataset) -> tuple:
    """ID (int or '4') or 'DatasetXXX_Name' -> (name, preprocessed folder, raw folder or None)."""
    preprocessed_root = os.environ.get("nnUNet_preprocessed")
    if not preprocessed_root:
        raise FSEFTError("nnUNet_preprocessed is not set; export it to the folder where splits_final.json "
                         "must go (see nnU-Net's documentation/setting_up_paths.md)")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    key = dataset
    if isinstance(dataset, str) and not dataset.startswith("Dataset"):
        try:
            key = int(dataset)
        except ValueError:
            raise FSEFTError(f"dataset '{dataset}' is neither an ID (e.g. 4) nor a name like Dataset004_Hippocampus")
    try:
        name = maybe_convert_to_dataset_name(key)
    except RuntimeError as e:  # none found, or several names for one ID
        first = str(e).splitlines()[0].split(". ")[0]  # nnU-Net's first sentence says which case
        raise FSEFTError(f"dataset {dataset}: {first} (nnUNet_preprocessed={preprocessed_root}, "
                         f"nnUNet_raw={os.environ.get('nnUNet_raw')})")
    raw_root = os.environ.get("nnUNet_raw")
    raw = os.path.join(raw_root, name) if raw_root else None
    return name, os.path.join(preprocessed_root, name), raw if raw and os.path.isdir(raw) else None


def _preprocessed_case_ids(preprocessed: str) -> list:
    """Case ids as nnU-Net's trainer sees them: the dataset class of each configuration folder.

    Several configurations (2d, 3d_fullres, ...) should hold the same cases; we keep those present
    in all of them so that every fold can be trained with any configuration."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    per_config = {}
    for sub in sorted(os.listdir(preprocessed)):
        folder = os.path.join(preprocessed, sub)
        if sub in _NOT_CONFIG_DIRS or not os.path.isdir(folder):
            continue
        try:
            ids = infer_dataset_class(folder).get_identifiers(folder)
        except (AssertionError, KeyError):  # empty, half-written or foreign folder
            continue
        if ids:
            per_config[sub] = set(ids)
    if not per_config:
        return []
    common = set.intersection(*per_config.values())
    for sub, ids in per_config.items():
        if ids - common:
            _warn(f"{len(ids - common)} case(s) of {sub} are missing from another preprocessed configuration "
                  f"and are left out of the splits (re-run nnUNetv2_preprocess to fix)")
    return sorted(common)


def _raw_label_files(raw: str, dataset_json: dict) -> dict:
    """case id -> raw label file (labelsTr, or the 'dataset' mapping of dataset.json if it has one)."""
    if "dataset" in dataset_json:
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
        return {k: v["label"] for k, v in get_filenames_of_train_images_and_targets(raw, dataset_json).items()}
    labels_dir, ending = os.path.join(raw, "labelsTr"), dataset_json["file_ending"]
    if not os.path.isdir(labels_dir):
        return {}
    return {f[: -len(ending)]: os.path.join(labels_dir, f)
            for f in sorted(os.listdir(labels_dir)) if f.endswith(ending) and not f.startswith(".")}


def _dataset_json(preprocessed: str, raw) -> dict:
    from nnunetv2_fseft.data.nnunet_raw import load_dataset_json
    for folder in (preprocessed, raw):
        if folder and os.path.isfile(os.path.join(folder, "dataset.json")):
            return load_dataset_json(folder)  # valid JSON, required keys, nnU-Net's label rules
    raise FSEFTError(f"no dataset.json in {preprocessed} or the raw dataset folder; run nnUNetv2_plan_and_preprocess "
                     f"or set nnUNet_raw")


def list_case_ids(preprocessed: str, raw, dataset_json: dict) -> tuple:
    """(sorted case ids, where they came from): preprocessed data if there is any, else raw labelsTr."""
    if os.path.isdir(preprocessed):
        ids = _preprocessed_case_ids(preprocessed)
        if ids:
            return ids, "preprocessed"
    if raw:
        ids = sorted(_raw_label_files(raw, dataset_json))
        if ids:
            return ids, "raw labelsTr"
    raise FSEFTError(f"found no cases: {preprocessed} has no preprocessed data and nnUNet_raw has no labelsTr for "
                     f"this dataset; run nnUNetv2_plan_and_preprocess first")


def load_query_file(path: str, cases: list) -> list:
    """A JSON list of case ids (or an object with a 'query' list, e.g. an old fewshot_splits.json)."""
    data = read_json(path, "pass a JSON list of case ids as --query-file")
    if isinstance(data, dict):
        data = data.get("query")
    if not isinstance(data, list) or not data or not all(isinstance(c, str) for c in data):
        raise FSEFTError(f"query file {path} must hold a non-empty JSON list of case ids, e.g. [\"case_001\"]")
    if len(set(data)) != len(data):
        raise FSEFTError(f"query file {path} lists a case twice")
    known = set(cases)
    unknown = [c for c in data if c not in known]
    if unknown:
        raise FSEFTError(f"query file {path} names {len(unknown)} case(s) not in the dataset, e.g. "
                         f"{', '.join(unknown[:3])}; the dataset has e.g. {', '.join(cases[:3])}")
    return sorted(data)


def draw_query(cases: list, n_query: int, seed: int = QUERY_SEED) -> list:
    rng = np.random.default_rng(seed)
    return sorted(str(c) for c in rng.choice(sorted(cases), size=n_query, replace=False))


def draw_supports(pool: list, k_max: int, seed: int) -> list:
    """The first k_max cases of a seeded permutation of the pool; K supports = its first K (nesting)."""
    rng = np.random.default_rng(seed)
    return [str(c) for c in rng.permutation(sorted(pool))[:k_max]]


def _normalise_ks_seeds(ks, seeds) -> tuple:
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise FSEFTError(f"-k needs shot counts >= 1, got {ks}")
    seeds = list(range(seeds)) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise FSEFTError(f"--seeds must be a count >= 1 (or distinct seeds >= 0), got {seeds}")
    return ks, seeds


def splits_are_ours(folder: str) -> bool:
    """True if splits_final.json is exactly what our fewshot_splits.json next to it describes."""
    splits, table = os.path.join(folder, SPLITS_FILE), os.path.join(folder, TABLE_FILE)
    if not (os.path.isfile(splits) and os.path.isfile(table)):
        return False
    try:
        t = read_json(table)
        expected = [{"train": f["train"], "val": t["query"]} for f in t["folds"]]
        return [{"train": s["train"], "val": s["val"]} for s in read_json(splits)] == expected
    except (FSEFTError, KeyError, TypeError):
        return False


def _earlier_folds(preprocessed: str, query: list, pool: list, keep_earlier: bool) -> list:
    """Our earlier folds, if they still hold: the same query set and the supports the same seeds draw now
    (the case list may have changed since). Otherwise [] (and they are replaced, with a warning) or an error."""
    if not splits_are_ours(preprocessed):
        return []
    table = read_json(os.path.join(preprocessed, TABLE_FILE))
    folds = table["folds"]
    if table["query"] == query and all(f["train"] == draw_supports(pool, f["k"], f["seed"]) for f in folds):
        return folds
    where = os.path.join(preprocessed, SPLITS_FILE)
    if keep_earlier:
        raise EarlierFoldsChanged(f"{where}: new splits would change the earlier folds (another query set, or "
                                  f"the dataset's cases changed)")
    _warn(f"replacing the earlier few-shot splits in {where} (another query set, or the dataset's cases changed); "
          f"models already trained on its folds were trained on the old table")
    return []


def _class_values(dataset_json: dict, target_class) -> dict:
    """class name -> label values that make it up (a list for nnU-Net regions)."""
    names = foreground_label_names(dataset_json)
    labels = dataset_json["labels"]
    values = {n: list(labels[n]) if isinstance(labels[n], (list, tuple)) else [labels[n]] for n in names}
    if target_class is None:
        return values
    match = [n for n in names if normalize_class_name(n) == normalize_class_name(target_class)]
    if not match:
        raise FSEFTError(f"--target-class '{target_class}' is not a class of dataset.json; classes: {', '.join(names)}")
    return {match[0]: values[match[0]]}


def find_missing_classes(cases: list, label_files: dict, class_values: dict) -> dict:
    """case -> class names with no voxel in its label map (cases without a label file are skipped)."""
    import SimpleITK as sitk
    from nnunetv2_fseft.data.nnunet_raw import read_image
    missing = {}
    for case in cases:
        path = label_files.get(case)
        if path is None or not os.path.isfile(path):
            continue
        present = set(np.unique(sitk.GetArrayFromImage(read_image(path))).tolist())
        lacking = [n for n, vals in class_values.items() if not present.intersection(vals)]
        if lacking:
            missing[case] = lacking
    return missing


def write_fewshot_splits(dataset, ks, seeds, n_query=None, query_file=None, target_class=None,
                         overwrite=False, check_classes=True, keep_earlier=False) -> dict:
    """Write splits_final.json + fewshot_splits.json for a dataset and return the fewshot_splits dict.

    dataset: ID or DatasetXXX_Name; ks: shot counts; seeds: a count (-> 0..n-1) or a list of seeds;
    n_query: size of the query set drawn with QUERY_SEED, or query_file: JSON list of case ids to use.
    Earlier folds of ours that still hold keep their numbers, and the new (K, seed) folds follow them;
    keep_earlier=True raises EarlierFoldsChanged rather than replace earlier folds that no longer hold.
    The returned dict also has 'splits_file' and 'missing_classes' (case -> classes absent in a support).
    """
    ks, seeds = _normalise_ks_seeds(ks, seeds)
    name, preprocessed, raw = resolve_dataset(dataset)
    dataset_json = _dataset_json(preprocessed, raw)
    class_values = _class_values(dataset_json, target_class)
    cases, source = list_case_ids(preprocessed, raw, dataset_json)

    if query_file is not None:
        query = load_query_file(query_file, cases)
        if n_query is not None and n_query != len(query):
            raise FSEFTError(f"--query {n_query} disagrees with the {len(query)} cases in {query_file}; drop --query")
    elif n_query is None or n_query < 1:
        raise FSEFTError("give the query set size with --query N (N >= 1) or a case list with --query-file")
    else:
        query = None
    n_q = len(query) if query is not None else n_query
    if ks[-1] + n_q > len(cases):
        fits = [f"with {n_q} query cases K can be at most {len(cases) - n_q}"] if len(cases) > n_q else []
        if len(cases) > ks[-1]:
            fits.append(f"with K={ks[-1]} at most {len(cases) - ks[-1]} query cases")
        raise FSEFTError(f"{name} has {len(cases)} cases ({source}) but K={ks[-1]} supports + {n_q} query cases "
                         f"need {ks[-1] + n_q}; {' or '.join(fits) or 'add cases'}")
    if query is None:
        query = draw_query(cases, n_q)

    in_query = set(query)
    pool = [c for c in cases if c not in in_query]
    folds = _earlier_folds(preprocessed, query, pool, keep_earlier)
    done = {(f["k"], f["seed"]) for f in folds}
    for k in ks:
        for s in seeds:
            if (k, s) not in done:
                folds.append({"fold": len(folds), "k": k, "seed": s, "train": draw_supports(pool, k, s)})

    os.makedirs(preprocessed, exist_ok=True)
    splits_path = os.path.join(preprocessed, SPLITS_FILE)
    new_splits = [{"train": f["train"], "val": list(query)} for f in folds]
    if os.path.isfile(splits_path) and not splits_are_ours(preprocessed):
        if not overwrite:
            raise FSEFTError(f"{splits_path} exists and was not written by this tool (e.g. nnU-Net's 5-fold split); "
                             f"add --overwrite to replace it (a copy is kept as {SPLITS_FILE}{BACKUP_SUFFIX})")
        backup = splits_path + BACKUP_SUFFIX
        if not os.path.exists(backup):  # keep the oldest: that is the user's original split
            shutil.copy2(splits_path, backup)

    missing = {}
    if check_classes:
        label_files = _raw_label_files(raw, dataset_json) if raw else {}
        if not label_files:  # nnU-Net copies the raw labels here during preprocessing
            gt = os.path.join(preprocessed, "gt_segmentations")
            ending = dataset_json.get("file_ending", "")
            label_files = {c: os.path.join(gt, c + ending) for c in cases} if os.path.isdir(gt) else {}
        support_cases = sorted({c for f in folds for c in f["train"]})
        if not any(os.path.isfile(label_files.get(c, "")) for c in support_cases):
            _warn("no label files found for the supports (raw labelsTr or gt_segmentations); class check skipped")
        missing = find_missing_classes(support_cases, label_files, class_values)
        for case, lacking in missing.items():
            in_folds = [f["fold"] for f in folds if case in f["train"]]
            if target_class is not None:  # the one class these folds are for: a support without it is useless
                raise FSEFTError(f"support case {case} (folds {in_folds}) has no voxel of the target class "
                                 f"{', '.join(lacking)} in its label map; fix: put it in the query set "
                                 f"(--query-file) or remove it from the dataset")
            _warn(f"support case {case} (folds {in_folds}) has no voxel of {', '.join(lacking)} in its label map")

    query_seed = None if query_file is not None else QUERY_SEED
    table = {"dataset": name, "source": source, "ks": sorted({f["k"] for f in folds}),
             "seeds": sorted({f["seed"] for f in folds}), "query_seed": query_seed,
             "folds": folds, "query": query}
    # written atomically, so a crash never leaves a half-written split file for nnU-Net to read
    write_json(os.path.join(preprocessed, TABLE_FILE), table)
    write_json(splits_path, new_splits)
    return dict(table, splits_file=splits_path, missing_classes=missing)


def format_fold_table(result: dict) -> str:
    lines = [f"{'fold':>4}  {'K':>3}  {'seed':>4}  supports"]
    for f in result["folds"]:
        lines.append(f"{f['fold']:>4}  {f['k']:>3}  {f['seed']:>4}  {' '.join(f['train'])}")
    lines.append(f"query ({len(result['query'])} cases, the val set of every fold): {' '.join(result['query'])}")
    return "\n".join(lines)
