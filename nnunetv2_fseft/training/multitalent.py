"""MultiTalentTrainer: nnU-Net training on datasets that each annotate only some classes (MultiTalent-style).

What changes against nnUNetTrainer, and nothing else:
- one sigmoid output per foreground class: plain integer labels are rewritten into nnU-Net's region form before
  the LabelManager is built, so nnU-Net's own region machinery makes targets, sigmoid inference, the label map
  (regions_class_order) and per-class --save_probabilities;
- the loss (BCE + soft Dice) only sees the classes each case's source dataset annotates (`fseft_cases` in
  dataset.json), see nnunetv2_fseft/losses/partial_label.py;
- cases are sampled ∝ 1/sqrt(cases of their source dataset) (MultiTalent v2);
- the online pseudo-Dice only counts annotated classes, and the final validation also writes
  validation/summary_annotated.json (Dice over annotated classes only);
- initial_lr = 1e-3 (MultiTalent v2; same SGD + poly schedule as nnU-Net);
- the sigmoid heads start at a foreground probability of head_prior (0.01) instead of 0.5: with nnU-Net's zero
  bias, short schedules learned only the largest organ (docs/multitalent.md, "Heads that start at p = 0.01").
"""
import copy
import json
import os
from collections import Counter

import numpy as np
import torch
from torch import autocast

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_fseft.checkpoints import NEW_CLASS_PRIOR, prior_logit
from nnunetv2_fseft.errors import FSEFTError, fail
from nnunetv2_fseft.losses.partial_label import PartialLabelDCBCELoss, annotation_mask
from nnunetv2_fseft.names import foreground_label_names, normalize_class_name
from nnunetv2_fseft.peft.tree import head_modules
from nnunetv2_fseft.training.optim_step import backward_and_step
from nnunetv2_fseft.training.schedule import apply_schedule, seed_from_environment

# ---------------------------------------------------------------- dataset.json helpers (no torch, no trainer)

def _is_background(value) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(int(v) == 0 for v in values)


def as_sigmoid_regions(dataset_json: dict) -> dict:
    """dataset.json whose labels make nnU-Net train one sigmoid output per foreground class.

    nnU-Net switches to sigmoid outputs ("regions") only if some label is a list of more than one value
    (LabelManager.has_regions). A dataset with such a region is returned unchanged (single-value labels are then
    already their own sigmoid channel). Otherwise each class k becomes the region [k, k] (exactly the voxels
    labelled k) and regions_class_order lists the values in increasing order, so a voxel claimed by several
    channels gets the highest label value in the predicted label map. Labels are written in value order, so output
    channel i is foreground_label_names(...)[i]."""
    out = copy.deepcopy(dataset_json)
    labels = out["labels"]
    if any(isinstance(v, (list, tuple)) and len(v) > 1 for k, v in labels.items() if k != "ignore"):
        return out

    def value(v):
        return int(v[0]) if isinstance(v, (list, tuple)) else int(v)

    classes = sorted(((value(v), k) for k, v in labels.items() if k != "ignore" and not _is_background(v)))
    new_labels = {k: v for k, v in labels.items() if k != "ignore" and _is_background(v)}
    new_labels.update({name: [v, v] for v, name in classes})
    if "ignore" in labels:
        new_labels["ignore"] = labels["ignore"]
    out["labels"] = new_labels
    out["regions_class_order"] = [v for v, _ in classes]
    return out


def output_channel_names(dataset_json: dict) -> list:
    """Class name of each network output channel, in LabelManager's region order (dataset.json label order)."""
    return [k for k, v in dataset_json["labels"].items() if k != "ignore" and not _is_background(v)]


def check_channel_order(dataset_json: dict) -> list:
    """The channel names; refuse a dataset.json whose channel order differs from foreground_label_names.

    The FSEFT trainers map pretrained heads by class name via foreground_label_names (value order), while
    nnU-Net orders region outputs as the labels are listed; both must agree."""
    channels = output_channel_names(dataset_json)
    expected = foreground_label_names(dataset_json)
    if channels != expected:
        raise FSEFTError(f"dataset.json lists its labels in the order {channels}, but by label value they are "
                         f"{expected}; list the labels in increasing value order (and regions_class_order to match)")
    return channels


def annotated_channels_by_case(dataset_json: dict, channel_names: list) -> dict:
    """{case_id: [output channel indices the case's dataset annotates]} from dataset.json's `fseft_cases`.

    Cases not listed (or no `fseft_cases` at all) annotate every class."""
    index = {normalize_class_name(n): i for i, n in enumerate(channel_names)}
    result = {}
    for case, info in dataset_json.get("fseft_cases", {}).items():
        names = info.get("annotated")
        if names is None:
            continue
        unknown = [n for n in names if normalize_class_name(n) not in index]
        if unknown:
            raise FSEFTError(f"fseft_cases[{case!r}] annotates {unknown}, which are not labels of dataset.json "
                             f"({channel_names}); fix the assembled dataset.json")
        if not names:
            raise FSEFTError(f"fseft_cases[{case!r}] annotates no class; drop the case or list its classes")
        result[str(case)] = sorted({index[normalize_class_name(n)] for n in names})
    return result


def source_dataset_by_case(dataset_json: dict) -> dict:
    """{case_id: source dataset name} from `fseft_cases` (cases not listed share one unnamed source)."""
    return {str(c): str(info.get("dataset", "")) for c, info in dataset_json.get("fseft_cases", {}).items()}


def balanced_sampling_probabilities(case_ids, source_of_case: dict):
    """Per-case sampling probabilities ∝ 1/sqrt(cases of its source dataset among case_ids), normalised.

    MultiTalent v2 (get_dataloaders of MultiTalent_trainer.py): a dataset's share of the batches then grows with
    sqrt(n) instead of n, so small datasets are not drowned by big ones. Returns None (nnU-Net's uniform sampling)
    when all cases come from one source. Cases missing from source_of_case share one unnamed source ''.
    """
    sources = [source_of_case.get(str(c), "") for c in case_ids]
    counts = Counter(sources)
    if len(counts) < 2:
        return None
    weights = [1.0 / counts[s] ** 0.5 for s in sources]
    total = sum(weights)
    return [w / total for w in weights]


def annotated_only_summary(summary: dict, channel_keys: list, channel_names: list, annotated_by_case: dict,
                           file_ending: str) -> dict:
    """Mean Dice per class over the validation cases that annotate it, from nnU-Net's summary.json.

    nnU-Net's final validation scores every class on every case, so a class a case's dataset does not annotate
    counts as "absent" there and a correct prediction of it as a false positive. channel_keys are summary.json's
    keys of the channels (str of each region)."""
    per_class = {name: [] for name in channel_names}
    for entry in summary["metric_per_case"]:
        case = os.path.basename(entry["reference_file"])[:-len(file_ending)]
        for c in annotated_by_case.get(case, range(len(channel_names))):
            dice = entry["metrics"][channel_keys[c]]["Dice"]
            if dice is not None and not np.isnan(dice):  # nan: class absent and not predicted
                per_class[channel_names[c]].append(dice)
    classes = {name: {"Dice": float(np.mean(v)) if v else None, "n_cases": len(v)} for name, v in per_class.items()}
    scored = [c["Dice"] for c in classes.values() if c["Dice"] is not None]
    return {"classes": classes, "foreground_mean_Dice": float(np.mean(scored)) if scored else None}


# ---------------------------------------------------------------- the trainer

class MultiTalentTrainer(nnUNetTrainer):
    learning_rate = 1e-3  # MultiTalent v2 (MultiTalent_trainer.py); SGD momentum 0.99 nesterov, poly, as nnU-Net
    # nnU-Net's schedule; a variant changes these class attributes (training/schedule.py), e.g. tests/ext's
    epochs, iterations_per_epoch, val_iterations_per_epoch = 1000, 250, 50
    head_prior = NEW_CLASS_PRIOR  # every sigmoid head's starting foreground probability (not nnU-Net's 0.5)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        # before super().__init__: the LabelManager, init_args (checkpoint) and the dataset.json copied to the
        # results folder must all see the sigmoid-region form
        dataset_json = as_sigmoid_regions(dataset_json)
        try:
            channel_names = check_channel_order(dataset_json)
            annotated_by_case = annotated_channels_by_case(dataset_json, channel_names)
        except FSEFTError as e:
            raise fail(str(e)) from None
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self)
        self.channel_names = channel_names
        self.annotated_by_case = annotated_by_case
        self.source_of_case = source_dataset_by_case(dataset_json)

    def initialize(self):
        seed_from_environment()
        super().initialize()

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True):
        """nnU-Net's network with every head's bias at logit(head_prior). nnU-Net's -pretrained_weights never loads
        heads, so a pre-trained start keeps this too; checkpoints (--c, inference) overwrite it."""
        network = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                     num_output_channels, enable_deep_supervision)
        with torch.no_grad():
            for head in head_modules(network):
                if head.bias is not None:
                    head.bias.fill_(prior_logit(cls.head_prior))
        return network

    def _annotated(self, keys) -> torch.Tensor:
        """(B, C) bool mask of the classes annotated by each case of the batch (nnU-Net puts case ids in 'keys')."""
        return annotation_mask(keys, self.annotated_by_case, len(self.channel_names)).to(self.device)

    def _build_loss(self):
        # keep nnU-Net's deep-supervision weights (incl. its DDP tweak); swap the loss inside
        loss = super()._build_loss()
        partial = PartialLabelDCBCELoss(batch_dice=self.configuration_manager.batch_dice, smooth=1e-5,
                                        use_ignore_label=self.label_manager.has_ignore_label, ddp=self.is_ddp)
        if isinstance(loss, DeepSupervisionWrapper):
            loss.loss = partial
            return loss
        return partial

    def _compute_loss(self, output, target, annotated):
        if isinstance(self.loss, DeepSupervisionWrapper):
            return self.loss(output, target, [annotated] * len(output))
        return self.loss(output, target, annotated)

    def get_dataloaders(self):
        """nnUNetTrainer.get_dataloaders (2.8.1) with the cases drawn ∝ 1/sqrt(n of their source dataset).

        nnU-Net hard-codes sampling_probabilities=None and offers no hook for it, so the method is restated from
        nnU-Net's own parts (transforms, datasets, loaders, augmenters); only the probabilities are new."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        tr_transforms = self.get_training_transforms(
            patch_size, rotation, deep_supervision_scales, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        val_transforms = self.get_validation_transforms(
            deep_supervision_scales, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()

        def loader(dataset, first_patch_size, transforms):
            return nnUNetDataLoader(
                dataset, self.batch_size, first_patch_size, patch_size, self.label_manager,
                oversample_foreground_percent=self.oversample_foreground_percent,
                sampling_probabilities=balanced_sampling_probabilities(dataset.identifiers, self.source_of_case),
                pad_sides=None, transforms=transforms, probabilistic_oversampling=self.probabilistic_oversampling)

        dl_tr = loader(dataset_tr, initial_patch_size, tr_transforms)
        dl_val = loader(dataset_val, patch_size, val_transforms)
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            train, val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == 'cuda'
            train = NonDetMultiThreadedAugmenter(data_loader=dl_tr, transform=None, num_processes=processes,
                                                 num_cached=max(6, processes // 2), seeds=None, pin_memory=pin,
                                                 wait_time=0.002)
            val = NonDetMultiThreadedAugmenter(data_loader=dl_val, transform=None,
                                               num_processes=max(1, processes // 2),
                                               num_cached=max(3, processes // 4), seeds=None, pin_memory=pin,
                                               wait_time=0.002)
        next(train)  # as nnU-Net: start the workers now
        next(val)
        return train, val

    def _forward_and_loss(self, batch: dict):
        """nnUNetTrainer's train/validation step head (2.8.1): batch to the device, forward under autocast on
        CUDA, loss, here with each case's annotation mask. Returns (output, target, annotated, loss)."""
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        target = [i.to(self.device, non_blocking=True) for i in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        annotated = self._annotated(batch['keys'])
        with autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
            output = self.network(data)
            del data
            loss = self._compute_loss(output, target, annotated)
        return output, target, annotated, loss

    def train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        _, _, _, loss = self._forward_and_loss(batch)
        return backward_and_step(self, loss)

    def validation_step(self, batch: dict) -> dict:
        # nnUNetTrainer.validation_step (2.8.1, region branch) with tp/fp/fn kept per sample and zeroed for the
        # classes a sample does not annotate, before summing over the batch
        output, target, annotated, l = self._forward_and_loss(batch)
        if self.enable_deep_supervision:
            output, target = output[0], target[0]
        predicted = (torch.sigmoid(output) > 0.5).long()
        if self.label_manager.has_ignore_label:
            mask = ~target[:, -1:] if target.dtype == torch.bool else 1 - target[:, -1:]
            target = target[:, :-1]
        else:
            mask = None
        spatial_axes = list(range(2, output.ndim))
        tp, fp, fn, _ = get_tp_fp_fn_tn(predicted, target, axes=spatial_axes, mask=mask)  # (B, C)
        a = annotated.float()
        return {'loss': l.detach().cpu().numpy(),
                'tp_hard': (tp * a).sum(0).detach().cpu().numpy(),
                'fp_hard': (fp * a).sum(0).detach().cpu().numpy(),
                'fn_hard': (fn * a).sum(0).detach().cpu().numpy()}

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation, plus validation/summary_annotated.json counting only annotated classes."""
        super().perform_actual_validation(save_probabilities)
        summary_file = os.path.join(self.output_folder, "validation", "summary.json")
        if self.local_rank != 0 or not self.annotated_by_case or not os.path.isfile(summary_file):
            return
        with open(summary_file) as f:
            summary = json.load(f)
        keys = [str(r) for r in self.label_manager.foreground_regions]
        result = annotated_only_summary(summary, keys, self.channel_names, self.annotated_by_case,
                                        self.dataset_json["file_ending"])
        with open(os.path.join(self.output_folder, "validation", "summary_annotated.json"), "w") as f:
            json.dump(result, f, indent=2)
        self.print_to_log_file("Mean Validation Dice over annotated classes only: ", result["foreground_mean_Dice"],
                               also_print_to_console=True)

    def on_validation_epoch_end(self, val_outputs):
        # a class no validation sample annotates has tp = fp = fn = 0: its Dice is 0/0 = nan, which nnU-Net's
        # nanmean (mean_fg_dice, hence the EMA and checkpoint_best) already skips; only the warning is silenced
        with np.errstate(invalid='ignore', divide='ignore'):
            super().on_validation_epoch_end(val_outputs)
