"""The story's steps before adaptation: data, assembly, planning, the foundation's folder and scores, the
target's preparation and few-shot folds, the query set, and nnU-Net's evaluation."""
import json
import os
import shutil
from pathlib import Path
from typing import List, Sequence, Tuple

from ..errors import FSEFTError
from .settings import CONFIGURATION, FOUNDATION, FOUNDATION_FOLD, PLANS, SOURCES, TARGET, Settings
from .workdir import Workdir


def make_synthetic_data(wd: Workdir, settings: Settings) -> dict:
    from ..synthetic import write_phantom_dataset
    size = {"shape": settings.phantom_shape, "spacing": phantom_spacing(settings)}
    for dataset_id, name, organs, seed, shift in SOURCES:
        write_phantom_dataset(wd.raw, dataset_id, name, list(organs), settings.n_source_cases, seed=seed,
                              intensity_shift=shift, **size)
    dataset_id, name, organs, seed, shift = TARGET
    write_phantom_dataset(wd.raw, dataset_id, name, list(organs), settings.n_target_cases, seed=seed,
                          intensity_shift=shift, **size)
    return {"sources": [s[0] for s in SOURCES], "target": TARGET[0]}


def phantom_spacing(settings: Settings) -> tuple:
    """The same 48 mm field of view whatever the phantoms' voxel count."""
    return tuple(48.0 / s for s in settings.phantom_shape)


def describe_phantoms(settings: Settings) -> str:
    sources = ", ".join("%s (%s)" % (name, "+".join(organs)) for _, name, organs, _, _ in SOURCES)
    size = "x".join(map(str, settings.phantom_shape)) + f" voxels of {phantom_spacing(settings)[0]:g} mm"
    return (f"{settings.n_source_cases} cases each ({size}): {sources}; target {TARGET[1]} ({'+'.join(TARGET[2])}, "
            f"organs +{TARGET[4]:.0f} HU): {settings.n_target_cases} cases")


def user_raw_folder() -> str:
    """--data reads the user's datasets from their nnUNet_raw."""
    user_raw = os.environ.get("nnUNet_raw")
    if not user_raw or not Path(user_raw).is_dir():
        raise FSEFTError("--data needs nnUNet_raw set to the folder that holds your raw datasets "
                         "(see nnU-Net's documentation/setting_up_paths.md)")
    return user_raw


def link_user_data(wd: Workdir, settings: Settings, user_raw: str) -> dict:
    """--data: link the user's raw datasets into the work dir's nnUNet_raw (read only; nothing is written there)."""
    foundation_ids, target_id = settings.data
    folders = {}
    for dataset_id in (*foundation_ids, target_id):
        matches = sorted(Path(user_raw).glob(f"Dataset{int(dataset_id):03d}_*"))
        if len(matches) != 1:
            found = ", ".join(m.name for m in matches) or "none"
            raise FSEFTError(f"--data: dataset id {dataset_id} must match exactly one folder "
                             f"Dataset{int(dataset_id):03d}_* in nnUNet_raw={user_raw} (found: {found})")
        folders[int(dataset_id)] = matches[0].resolve()
        link = wd.raw / matches[0].name
        if not link.exists():
            link.symlink_to(matches[0].resolve(), target_is_directory=True)
    return {"sources": list(foundation_ids), "target": target_id, "linked": {k: str(v) for k, v in folders.items()}}


def foundation_id(wd: Workdir, settings: Settings) -> int:
    """The assembled foundation's id: 510 for the phantoms; with --data the highest id <= 999 not linked."""
    if settings.data is None:
        return FOUNDATION[0]
    taken = {int(p.name[7:10]) for p in wd.raw.glob("Dataset[0-9][0-9][0-9]_*") if not p.name.endswith("_DemoFoundation")}
    free = [i for i in range(999, 900, -1) if i not in taken]
    if not free:
        raise FSEFTError("--data: no free dataset id between 901 and 999 for the assembled foundation dataset")
    return free[0]


def assemble(wd: Workdir, settings: Settings, sources: Sequence[int]) -> dict:
    from ..data.assemble import assemble_datasets
    fid = foundation_id(wd, settings)
    name = FOUNDATION[1] if settings.data is None else "DemoFoundation"
    folder = assemble_datasets(list(sources), fid, name, overwrite=True)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    annotated = {}
    for info in dataset_json.get("fseft_cases", {}).values():
        annotated.setdefault(info["dataset"], info["annotated"])
    return {"dataset": folder.name, "id": fid, "n_cases": dataset_json["numTraining"],
            "classes": [k for k in dataset_json["labels"] if k != "background"], "annotated": annotated}


def plan(dataset: str, settings: Settings) -> dict:
    from ..planning import plan_with_preset
    plans_name = plan_with_preset(dataset, settings.preset, num_processes=1, overwrite=True)
    return {"plans": plans_name, **_plan_summary(Path(os.environ["nnUNet_preprocessed"]) / dataset / f"{plans_name}.json")}


def _plan_summary(plans_file: Path) -> dict:
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"][CONFIGURATION]
    return {"patch_size": config["patch_size"], "batch_size": config["batch_size"],
            "features": config["architecture"]["arch_kwargs"]["features_per_stage"]}


def foundation_folder(wd: Workdir, dataset: str, settings: Settings) -> Path:
    return wd.results / dataset / f"MultiTalentTrainer_{settings.schedule}__{PLANS}__{CONFIGURATION}"


def foundation_scores(model_folder: Path) -> dict:
    """Held-out Dice per class from the foundation's final validation (annotated classes only, if written)."""
    validation = model_folder / f"fold_{FOUNDATION_FOLD}" / "validation"
    annotated = validation / "summary_annotated.json"
    if annotated.is_file():
        classes = json.loads(annotated.read_text())["classes"]
        return {k: v["Dice"] for k, v in classes.items()}
    summary = validation / "summary.json"
    if summary.is_file():
        return {"mean": json.loads(summary.read_text())["foreground_mean"]["Dice"]}
    return {}


def prepare(wd: Workdir, settings: Settings, target: int, model_folder: Path) -> dict:
    from ..data.fewshot import write_fewshot_splits
    from ..planning import prepare_target
    plans_name = prepare_target(target, model_folder, num_processes=1, overwrite=True)
    n_query, ks = settings.n_query, list(settings.ks)
    if settings.data is not None:
        n_query, ks = _fit_ks(_n_cases(wd, target), ks)
    result = write_fewshot_splits(target, ks=ks, seeds=1, n_query=n_query, overwrite=True)
    return {"dataset": result["dataset"], "plans": plans_name, "query": result["query"],
            "folds": [{"fold": f["fold"], "k": f["k"], "train": f["train"]} for f in result["folds"]
                      if f["k"] in ks and f["seed"] == 0]}  # a rerun with other Ks keeps the earlier folds too


def _n_cases(wd: Workdir, target: int) -> int:
    folder = next(wd.raw.glob(f"Dataset{int(target):03d}_*"))
    return int(json.loads((folder / "dataset.json").read_text())["numTraining"])


def _fit_ks(n_cases: int, ks: List[int]) -> Tuple[int, List[int]]:
    """--data: up to 10 query cases, and the Ks that still leave supports for them."""
    n_query = max(1, min(10, n_cases - max(ks), n_cases // 2))
    fitting = [k for k in ks if k + n_query <= n_cases]
    if not fitting:
        raise FSEFTError(f"--data: the target has {n_cases} training cases; it needs at least 2 "
                         "(1 support + 1 query)")
    return n_query, fitting


def link_query(wd: Workdir, dataset: str, query: Sequence[str]) -> Tuple[Path, Path]:
    """query/images (the query cases' images, for nnUNetv2_predict) and query/labels (references)."""
    raw = wd.raw / dataset
    dataset_json = json.loads((raw / "dataset.json").read_text())
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    files = get_filenames_of_train_images_and_targets(str(raw), dataset_json)
    images, labels = wd.root / "query" / "images", wd.root / "query" / "labels"
    for folder in (images, labels):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    ending = dataset_json["file_ending"]
    for case in query:
        for c, image in enumerate(files[case]["images"]):
            _link(Path(image), images / f"{case}_{c:04d}{ending}")
        _link(Path(files[case]["label"]), labels / f"{case}{ending}")
    return images, labels


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def evaluate(pred_folder: Path, labels: Path, dataset_json: dict, plans_file: Path) -> dict:
    """nnU-Net's own evaluation of a prediction folder (writes summary.json there)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    label_manager = PlansManager(str(plans_file)).get_label_manager(dataset_json)
    example = next(labels.iterdir())
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(example), verbose=False)()
    regions = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    summary = compute_metrics_on_folder(str(labels), str(pred_folder), str(pred_folder / "summary.json"), reader,
                                        dataset_json["file_ending"], regions, label_manager.ignore_label,
                                        num_processes=1, chill=False)
    from ..names import dice_by_class
    return {"dice": summary["foreground_mean"]["Dice"], "n_query": len(summary["metric_per_case"]),
            "dice_per_class": dice_by_class(summary, dataset_json)}


def saved_parameters(fold_folder: Path) -> Tuple[int, int, str]:
    """(trainable parameters, bytes, file): from adapter.safetensors, else the full checkpoint's network."""
    adapter = fold_folder / "adapter.safetensors"
    if adapter.is_file():
        from safetensors import safe_open
        n = 0
        with safe_open(str(adapter), framework="pt") as f:
            for key in f.keys():
                n += _numel(f.get_slice(key).get_shape())
        return n, adapter.stat().st_size, "adapter.safetensors"
    import torch
    checkpoint = fold_folder / "checkpoint_final.pth"
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    seen, n = set(), 0
    for tensor in weights.values():  # dynamic-network-architectures keeps each conv twice in the state dict
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            n += tensor.numel()
    return n, checkpoint.stat().st_size, "checkpoint_final.pth"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
