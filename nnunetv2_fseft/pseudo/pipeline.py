"""Learn from unlabelled scans: pseudo-label them (atlas registration of the supports, the adapted model, or both),
write a dataset with nnU-Net's ignore label where the pseudo-labels are not trusted, preprocess it with the target's
plans, and train any trainer on it with nnUNetv2_train, for one or more rounds.

Round r (r = 1, 2, ...) writes dataset OUT_ID + r - 1. Round 1 labels with the requested source; later rounds add the
previous round's model (registration -> both). With 'model' or 'both' and no adapted model given, the supports'
own fold of the target is trained first (the ordinary few-shot run; reused when already trained).
"""
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from ..commands import console_script, plugin_environment
from ..data.fewshot import resolve_dataset
from ..data.nnunet_raw import Geometry, dataset_folder, load_dataset_json, read_image, training_cases
from ..errors import FSEFTError
from ..files import read_json, write_json
from .dataset import copy_plans, ignore_value, write_raw, write_split
from .images import unlabelled_cases
from .model_labels import CONFIDENCE, confident_labels, predict_probabilities
from .registration import RegistrationFailed, fuse, propagate

SOURCES = ("registration", "model", "both")
MARGIN = 1  # voxels next to a propagated boundary are left to the ignore label (set a priori, not tuned)


@dataclass
class Target:
    """The labelled target and the few-shot fold whose training cases are the supports."""
    name: str
    raw: Path
    pre: Path
    dataset_json: dict
    fold: int
    supports: List[str]
    val: List[str]


def read_target(dataset, fold: int) -> Target:
    name, pre, raw = resolve_dataset(dataset)
    if raw is None:
        raise FSEFTError(f"{name} is not in nnUNet_raw; the supports' images and labels are read from there")
    splits = read_json(Path(pre) / "splits_final.json",
                       "write the few-shot folds first (nnUNetv2_fseft_fewshot_splits -d TARGET -k 1 5 ...)")
    if not 0 <= fold < len(splits):
        raise FSEFTError(f"fold {fold} is not in {pre}/splits_final.json ({len(splits)} folds); fix: pass -f with "
                         "the few-shot fold that holds your supports (nnUNetv2_fseft_fewshot_splits prints them)")
    return Target(name, Path(raw), Path(pre), load_dataset_json(Path(raw)), fold,
                  list(dict.fromkeys(splits[fold]["train"])), list(splits[fold]["val"]))


def n_classes(dataset_json: dict) -> int:
    return ignore_value(dataset_json)  # integer labels 0..max: max + 1 classes


def registration_labels(target: Target, images: Dict[str, List[Path]], margin: int, log) -> Dict[str, tuple]:
    """case -> (fused label, trusted) by registering every support onto it; a case whose registration fails is
    skipped with one line."""
    cases = training_cases(target.raw, target.dataset_json)
    atlases = [(read_image(cases[s][0][0]), read_image(cases[s][1])) for s in target.supports]
    out = {}
    for case, files in images.items():
        fixed = read_image(files[0])  # channel 0 drives the registration
        try:
            maps = [propagate(fixed, image, label) for image, label in atlases]
        except RegistrationFailed as e:
            log(f"skipped {case}: registration failed ({e})")
            continue
        out[case] = fuse(maps, n_classes(target.dataset_json), margin)
    return out


def model_labels(model: Path, fold, images: Dict[str, List[Path]], threshold: float, device: str,
                 log) -> Dict[str, tuple]:
    probabilities = predict_probabilities(model, fold, images, device, log)
    return {case: confident_labels(p, threshold) for case, p in probabilities.items()}


def combine(registration: tuple, model: tuple) -> tuple:
    """Trusted where both sources are trusted and agree."""
    (reg_label, reg_trusted), (model_label, model_trusted) = registration, model
    return reg_label, reg_trusted & model_trusted & (reg_label == model_label)


@dataclass
class Request:
    target: str
    fold: int
    images: Path
    out_id: int
    labels: str = "registration"
    model: Optional[Path] = None       # an adapted model folder for 'model' / 'both'
    model_fold: Optional[int] = None   # its fold (default: the target fold)
    trainer: Optional[str] = None      # train each round with nnUNetv2_train when given
    pretrained_weights: Optional[Path] = None
    rounds: int = 1
    plans: str = "nnUNetPlans"
    configuration: str = "3d_fullres"
    margin: int = MARGIN
    threshold: float = CONFIDENCE
    name: Optional[str] = None
    overwrite: bool = False
    device: str = "cpu"
    num_processes: int = 2


def check(request: Request) -> None:
    if request.labels not in SOURCES:
        raise FSEFTError(f"--labels {request.labels!r} is not one of {', '.join(SOURCES)}")
    if request.rounds < 1:
        raise FSEFTError("--rounds must be at least 1")
    if request.rounds > 1 and not request.trainer:
        raise FSEFTError("--rounds > 1 needs -tr TRAINER: each later round labels with the previous round's model")
    if request.labels != "registration" and request.model is None and not request.trainer:
        raise FSEFTError(f"--labels {request.labels} needs an adapted model: -m MODEL_FOLDER (trained on the "
                         "supports' fold), or -tr TRAINER to train one on the supports first")
    if request.trainer and request.pretrained_weights is not None and not Path(request.pretrained_weights).is_file():
        raise FSEFTError(f"-pretrained_weights {request.pretrained_weights} does not exist")


def model_folder(dataset_name: str, trainer: str, plans: str, configuration: str) -> Path:
    from nnunetv2.paths import nnUNet_results
    return Path(nnUNet_results) / dataset_name / f"{trainer}__{plans}__{configuration}"


def train(dataset: str, fold: int, request: Request, log, reuse: bool) -> Path:
    """nnUNetv2_train (nnU-Net's own command) for one fold; with `reuse`, skipped when it is trained already."""
    folder = model_folder(dataset, request.trainer, request.plans, request.configuration)
    if reuse and (folder / f"fold_{fold}" / "checkpoint_final.pth").is_file():
        log(f"{folder}/fold_{fold} is trained already; using it")
        return folder
    cmd = [console_script("nnUNetv2_train"), dataset, request.configuration, str(fold), "-tr", request.trainer,
           "-p", request.plans, "-device", request.device]
    if request.pretrained_weights:
        cmd += ["-pretrained_weights", str(request.pretrained_weights)]
    log("$ " + " ".join(cmd))
    if subprocess.run(cmd, env=plugin_environment()).returncode:
        raise FSEFTError(f"nnUNetv2_train {dataset} fold {fold} failed (its output is above)")
    return folder


def preprocess(out_name: str, target: Target, request: Request) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    out_pre = Path(nnUNet_preprocessed) / out_name
    copy_plans(target.pre, out_pre, request.plans, out_name)
    write_json(out_pre / "dataset.json", read_json(Path(nnUNet_raw) / out_name / "dataset.json"))
    preprocess_dataset(int(out_name[7:10]), request.plans, [request.configuration], [request.num_processes],
                       show_progress_bar=False)


def build_round(target: Target, images: Dict[str, List[Path]], out_id: int, source: str, model, model_fold,
                request: Request, log) -> dict:
    """One pseudo-labelled dataset, preprocessed and split; returns what was done."""
    labels = {}
    if source in ("registration", "both"):
        labels["registration"] = registration_labels(target, images, request.margin, log)
    if source in ("model", "both"):
        labels["model"] = model_labels(model, model_fold, images, request.threshold, request.device, log)
    cases = sorted(set.intersection(*(set(v) for v in labels.values())))
    if not cases:
        raise FSEFTError("no unlabelled scan could be pseudo-labelled (every registration failed); nothing written")
    pseudo = {}
    for case in cases:
        label, trusted = (combine(labels["registration"][case], labels["model"][case]) if source == "both"
                          else labels[source][case])
        pseudo[case] = (images[case], label, trusted, Geometry.of_file(images[case][0]))
    name = request.name or f"{target.name[11:]}Pseudo"
    description = (f"{target.name} fold {target.fold}: {len(target.supports)} supports + {len(pseudo)} scans "
                   f"pseudo-labelled by {source} (ignore label where untrusted)")
    out_raw = write_raw(out_id, name, target.raw, target.dataset_json, target.supports, target.val, pseudo,
                        request.overwrite, description)
    preprocess(out_raw.name, target, request)
    from nnunetv2.paths import nnUNet_preprocessed
    split = write_split(Path(nnUNet_preprocessed) / out_raw.name, target.supports, cases, target.val)
    trusted = float(np.mean([p[2].mean() for p in pseudo.values()]))
    log(f"{out_raw.name}: {len(target.supports)} supports (each listed {split['support_repeats']}x in fold 0's "
        f"training list), {len(pseudo)} pseudo-labelled scans ({100 * trusted:.1f}% of their voxels trusted), "
        f"{len(target.val)} validation cases")
    return {"dataset": out_raw.name, "pseudo_cases": cases, "trusted_fraction": trusted, **split}


def run(request: Request, log: Callable[[str], None] = print) -> List[dict]:
    """The whole command: every round's dataset (and its training when -tr is given)."""
    check(request)
    target = read_target(request.target, request.fold)
    images = unlabelled_cases(request.images, target.dataset_json["file_ending"], target.dataset_json["channel_names"])
    ignore_value(target.dataset_json)  # refuse a target with an ignore label or regions before any work
    name = request.name or f"{target.name[11:]}Pseudo"
    for r in range(request.rounds):  # nothing of the user's is overwritten without --overwrite: check before any work
        out = dataset_folder(request.out_id + r, name)
        trained = request.trainer and model_folder(out.name, request.trainer, request.plans, request.configuration)
        for existing in (out, trained):
            if existing and existing.exists() and not request.overwrite:
                raise FSEFTError(f"{existing} already exists; fix: pass --overwrite to replace it, or choose another "
                                 "output dataset id (-o)")
    model, model_fold = request.model, request.model_fold if request.model_fold is not None else request.fold
    if request.labels != "registration" and model is None:
        model = train(target.name, target.fold, request, log, reuse=True)
    source, rounds = request.labels, []
    for r in range(request.rounds):
        done = build_round(target, images, request.out_id + r, source, model, model_fold, request, log)
        if request.trainer:
            model, model_fold = train(done["dataset"], 0, request, log, reuse=False), 0
            done["model"] = str(model)
            log(f"round {r + 1}: predict with nnUNetv2_predict -d {done['dataset'][7:10]} -f 0 -tr {request.trainer} "
                f"-p {request.plans} -c {request.configuration}")
        rounds.append(done)
        source = "both" if source != "model" else "model"
    return rounds


def atlas(target_dataset, fold: int, images_folder, output, overwrite: bool = False, log=print) -> List[str]:
    """The no-training baseline: each image segmented by the supports' propagated labels (majority vote), written
    as nnUNetv2_predict writes its segmentations (CASE.ext). Returns the cases written."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FSEFTError(f"{output} exists and is not empty; fix: pass --overwrite or choose another output folder")
    target = read_target(target_dataset, fold)
    ending = target.dataset_json["file_ending"]
    images = unlabelled_cases(images_folder, ending, target.dataset_json["channel_names"])
    labels = registration_labels(target, images, 0, log)
    output.mkdir(parents=True, exist_ok=True)
    for case, (label, _) in labels.items():
        image = sitk.GetImageFromArray(label)
        image.CopyInformation(read_image(images[case][0]))
        sitk.WriteImage(image, str(output / f"{case}{ending}"), useCompression=True)
    log(f"atlas: {len(labels)} of {len(images)} scans segmented by {len(target.supports)} propagated support(s) "
        f"-> {output}")
    return sorted(labels)
