"""FSEFTTrainer: nnU-Net's trainer with a PEFT method plugged in. A method is chosen by class attributes,
so each trainer in trainers/ is a declaration (method, learning rate), and a user's schedule override is a
tiny subclass, as with nnU-Net's own variants."""
import os
from pathlib import Path

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from ..checkpoints import apply_foundation, is_head_key, save_adapter, train_input_projection
from ..errors import FSEFTError, fail
from ..files import atomic_write, read_json, sha256, write_json
from ..foundations import read_foundation
from .activation_checkpointing import enable_activation_checkpointing
from .cache_resume import feature_shape, remove_sidecars, restore_sidecar, save_sidecar
from .feature_cache import FeatureCache, FeaturePool, LazyBatch, LazyBatches, head_train_step, is_black_box
from .schedule import apply_schedule, seed_from_environment
from ..peft import METHODS, apply_peft, count_parameters, get_method, resolved_options

ADAPTER_FORMAT = "nnunetv2_fseft.adapter/1"
ALLOW_UNTRAINED_DECODER_ENV = "nnUNet_fseft_allow_untrained_decoder"


class GroupPolyLRScheduler(PolyLRScheduler):
    """nnU-Net's poly decay, applied to each parameter group's own starting rate (nnU-Net's gives every group
    initial_lr, which would undo head_learning_rate after the first epoch)."""

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        factor = (1 - current_step / self.max_steps) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class FSEFTTrainer(nnUNetTrainer):
    peft_method = "full"
    peft_options = {}
    learning_rate = 1e-4
    # the segmentation head's own rate (None: learning_rate), the linear probe's for every method: new head channels
    # start with zero weights and Adam moves a weight by about its rate per step, so a head at the body's rate stays
    # uncommitted (docs/hippocampus.md, "New head channels start with zero weights")
    head_learning_rate = 1e-2
    weight_decay_fseft = 1e-4
    # short few-shot schedule: 20 x 50 = 1,000 iterations; a subclass changes it (README, "Changing the schedule")
    epochs = 20
    iterations_per_epoch = 50
    val_iterations_per_epoch = 10
    # black-box methods (only the final head trains) train on cached frozen-trunk features; docs/cost.md
    use_feature_cache = True
    feature_pool_size = 100           # samples (augmented patches) kept in the pool
    feature_refresh_every = 10        # once full, encode a fresh augmented batch every N steps (0: never)
    feature_pool_memory_mb = 2048     # past this, pool samples go to a temporary folder in output_folder
    feature_dtype = torch.float16
    feature_cache = None              # the FeatureCache while training, when used
    # recompute each stage's activations in backward (less memory, ~1 extra forward); docs/cost.md
    activation_checkpointing = False
    _resume_cache_from = None         # (checkpoint, epoch) loaded by --c: its sidecar refills the pool
    # a method that keeps the decoder frozen is refused on an encoder-only foundation (nnssl), whose decoder starts
    # untrained; True in a subclass (or nnUNet_fseft_allow_untrained_decoder=1) trains it anyway (docs/foundations.md)
    allow_untrained_decoder = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # a user's subclass with a typo in peft_method or peft_options: one line from nnUNetv2_train before anything
        # is set up, not a KeyError traceback from inside nnU-Net's initialize()
        try:
            resolved_options(self.peft_method, self.peft_options)
        except KeyError as e:
            raise fail(f"{type(self).__name__}: {e.args[0]}") from None
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self)
        self.weight_decay = self.weight_decay_fseft
        # deep supervision only where every head trains; black-box methods train the last head only
        self.enable_deep_supervision = get_method(self.peft_method).deep_supervision

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True):
        # a classmethod, so inference (which never instantiates the trainer) rebuilds the same adapted network
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
        return apply_peft(network, cls.peft_method, cls.peft_options)

    def plain_network(self) -> torch.nn.Module:
        """The network without DDP / torch.compile wrappers. Checked by type, not by is_ddp: nnU-Net builds the
        optimizer (configure_optimizers) before it wraps the network in DDP."""
        mod = self.network.module if isinstance(self.network, DistributedDataParallel) else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def initialize(self):
        seed_from_environment()
        super().initialize()
        trainable, total = count_parameters(self.plain_network())
        self.print_to_log_file(f"FSEFT method '{self.peft_method}' {resolved_options(self.peft_method, self.peft_options)}: "
                               f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)")
        if self.activation_checkpointing:
            stages = enable_activation_checkpointing(self.plain_network())
            self.print_to_log_file(f"activation checkpointing: {stages} encoder/decoder stages")
        self._route_pretrained_weights()

    def _route_pretrained_weights(self):
        """nnU-Net's -pretrained_weights loader insists on identical keys and the saving device. For this run,
        route it to the plugin's loader (adapted keys, CPU mapping, head mapping, one-line errors)."""
        import nnunetv2.run.run_training as run_training
        original = getattr(run_training.load_pretrained_weights, "original", run_training.load_pretrained_weights)
        trainer = self

        def load_pretrained_weights(network, fname, verbose=False):
            if network is not trainer.network:
                return original(network, fname, verbose)
            trainer.load_foundation(fname)

        load_pretrained_weights.original = original
        run_training.load_pretrained_weights = load_pretrained_weights

    def _stem_trained_before(self) -> bool:
        """--c of a run whose stem trained because its input channels were mapped: --c never sees
        -pretrained_weights, so foundation.json says so (nnU-Net pops plans["continue_training"] in __init__; its
        logger keeps it as `resume`)."""
        return bool(getattr(self.logger, "resume", False) and (self._foundation_record() or {}).get("stem_trains"))

    def _refuse_untrained_decoder(self, foundation) -> None:
        method = get_method(self.peft_method)
        if foundation.parts != "encoder" or not method.needs_trained_decoder:
            return
        if self.allow_untrained_decoder or os.environ.get(ALLOW_UNTRAINED_DECODER_ENV) == "1":
            self.print_to_log_file(f"WARNING: '{self.peft_method}' keeps the decoder frozen, and this foundation's "
                                   "decoder starts untrained (opted in with allow_untrained_decoder)")
            return
        fitting = ", ".join(name for name, m in METHODS.items() if not m.needs_trained_decoder)
        raise FSEFTError(f"{foundation.path} holds an encoder only (its decoder was not trained for segmentation), and "
                         f"method '{self.peft_method}' keeps the decoder frozen; use a method that trains it: {fitting} "
                         f"(e.g. -tr FSEFTDecoderLoRATrainer), or opt in with allow_untrained_decoder = True in a "
                         f"trainer subclass or {ALLOW_UNTRAINED_DECODER_ENV}=1")

    def load_foundation(self, fname) -> None:
        network = self.plain_network()
        trainable_before = count_parameters(network)[0]
        try:
            foundation = read_foundation(fname)
            self._refuse_untrained_decoder(foundation)
            report = apply_foundation(network, foundation, self.dataset_json)
        except FSEFTError as e:
            raise fail(str(e)) from None
        for line in report.lines:
            self.print_to_log_file(line)
        if count_parameters(network)[0] != trainable_before:  # the mapped stem joins the trained parameters
            if self.is_ddp:  # DDP registered its parameters in initialize(); a late one would not be synchronised
                raise fail("another input channel count makes the stem train, which DDP cannot add after "
                           "initialisation: train this target on one GPU")
            self.optimizer, self.lr_scheduler = self.configure_optimizers()
            trainable, total = count_parameters(network)
            self.print_to_log_file(f"now training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)")
        # the weights' digest identifies the foundation (apply_adapter checks it); the file's also changes with its log
        pointer = {"path": str(Path(foundation.path).resolve()), "sha256": sha256(foundation.path),
                   "weights_sha256": foundation.weights_sha256, "source": foundation.source,
                   "parts": foundation.parts, "input_channels": report.channel_rule, "stem_trains": report.stem_trains,
                   "citations": foundation.citations}
        write_json(self._foundation_file(), pointer)

    def _foundation_file(self) -> Path:
        return Path(self.output_folder) / "foundation.json"

    def _foundation_record(self):
        """What load_foundation recorded in foundation.json (None: no -pretrained_weights in this folder)."""
        if not self._foundation_file().is_file():
            return None
        return read_json(self._foundation_file(), "train the fold again from -pretrained_weights, without --c")

    def on_train_start(self):
        super().on_train_start()
        if not self._foundation_file().is_file() and self.peft_method != "full":
            self.print_to_log_file(f"WARNING: no -pretrained_weights given: '{self.peft_method}' adapts a randomly "
                                   "initialised network. Pass the foundation's checkpoint (nnU-Net or nnssl).")
        self._start_feature_cache()

    def _amp(self):
        from torch import autocast
        from nnunetv2.utilities.helpers import dummy_context
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _start_feature_cache(self) -> None:
        network = self.plain_network()
        if not self.use_feature_cache or self.enable_deep_supervision or not is_black_box(network):
            return
        # under DDP each rank pools its own batches; its own seed draws different samples from them
        pool = FeaturePool(self.feature_pool_size, self.feature_dtype, self.feature_pool_memory_mb * 2 ** 20,
                           spill_dir=self.output_folder, seed=self.local_rank)
        self.feature_cache = FeatureCache(pool, self.feature_refresh_every)
        self.dataloader_train = LazyBatches(self.dataloader_train)
        self.print_to_log_file(f"feature cache: pool of {self.feature_pool_size} samples ({self.feature_dtype}), "
                               f"refresh every {self.feature_refresh_every} steps once full"
                               + (", head gradients averaged over the DDP ranks" if self.is_ddp else ""))
        if self._resume_cache_from is not None:
            if self.is_ddp:  # only rank 0 saves; each rank keeps its own pool
                self.print_to_log_file("feature cache: not restored under DDP; rebuilding the pool")
            else:
                shape = feature_shape(network, self.configuration_manager.patch_size)
                self.print_to_log_file(restore_sidecar(self.feature_cache, *self._resume_cache_from, shape))

    def train_step(self, batch: dict) -> dict:
        if self.feature_cache is None:
            return super().train_step(batch.load() if isinstance(batch, LazyBatch) else batch)
        features, target = self.feature_cache.batch_for_step(self.plain_network(), batch, self.batch_size,
                                                             self.device, self._amp)
        return head_train_step(self, features, target, self._amp)

    def on_train_end(self):
        if isinstance(self.dataloader_train, LazyBatches):  # nnU-Net shuts its own dataloader down
            self.dataloader_train = self.dataloader_train.loader
        if self.feature_cache is not None:
            c = self.feature_cache
            self.print_to_log_file(f"feature cache: {c.encoded_batches} trunk passes in {c.steps} steps "
                                   f"({c.encode_seconds:.1f} s), {c.pool.spilled} samples spilled to disk")
            c.close()
            self.feature_cache = None
        super().on_train_end()
        if self.local_rank == 0:  # checkpoint_final.pth is written: --c never reads latest/best (or their pools)
            remove_sidecars(self.output_folder)

    def configure_optimizers(self):
        # nnU-Net's initialize() calls this before it wraps the network in DDP: a resumed run's mapped stem turns
        # trainable here, so that DDP registers it and averages its gradients like every other trained parameter
        if self._stem_trained_before():
            train_input_projection(self.plain_network())
        trainable = [(n, p) for n, p in self.plain_network().named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in trainable if not is_head_key(n)], "lr": self.initial_lr},
                  {"params": [p for n, p in trainable if is_head_key(n)], "lr": self.head_learning_rate or self.initial_lr}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=self.weight_decay)
        return optimizer, GroupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def adapter_config(self) -> dict:
        foundation = self._foundation_record()
        axes = self.inference_allowed_mirroring_axes
        trainable, total = count_parameters(self.plain_network())
        peak_cuda = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return {"format": ADAPTER_FORMAT, "trainer_name": type(self).__name__, "method": self.peft_method,
                "options": resolved_options(self.peft_method, self.peft_options),
                "plans_name": self.plans_manager.plans_name, "configuration": self.configuration_name,
                "fold": self.fold, "labels": self.dataset_json["labels"], "foundation": foundation,
                "inference_allowed_mirroring_axes": list(axes) if axes is not None else None,
                "trainable_parameters": trainable, "total_parameters": total,
                "peak_cuda_memory_bytes": peak_cuda}

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        atomic_write(filename, super().save_checkpoint)
        # the pool goes next to the checkpoint, tagged with the epoch nnU-Net stores in it (docs/cost.md, Resuming)
        save_sidecar(None if self.is_ddp else self.feature_cache, filename, self.current_epoch + 1)
        if os.path.basename(filename) == "checkpoint_final.pth":
            save_adapter(self.plain_network(), self.output_folder, self.adapter_config())

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        try:
            super().load_checkpoint(filename_or_checkpoint)
        except ValueError as e:  # torch's optimiser refuses another parameter-group layout
            if "parameter group" not in str(e):
                raise
            raise fail(f"{filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else 'the checkpoint'} "
                       f"holds an optimiser with other parameter groups than {type(self).__name__} builds (a "
                       "checkpoint of an older nnunetv2_fseft, before the head got its own learning rate); it "
                       "cannot be resumed with --c: train the fold again without --c") from None
        if isinstance(filename_or_checkpoint, str):  # --c: on_train_start builds the pool, then refills it
            self._resume_cache_from = (filename_or_checkpoint, self.current_epoch)
