"""The plugin's trainers declare their schedule as class attributes (so a user's override is a tiny subclass, as
with nnU-Net's own variants); this maps them onto the fields nnUNetTrainer.__init__ sets, in one place."""


def apply_schedule(trainer) -> None:
    """After nnUNetTrainer.__init__: learning_rate, epochs, iterations_per_epoch, val_iterations_per_epoch."""
    trainer.initial_lr = trainer.learning_rate
    trainer.num_epochs = trainer.epochs
    trainer.num_iterations_per_epoch = trainer.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = trainer.val_iterations_per_epoch
    trainer.save_every = max(1, trainer.epochs // 4)  # so --c has something recent to resume from


def without_mirroring(base):
    """nnUNetTrainerNoMirroring's override on top of `base` (no mirroring in augmentation or at test time), for
    phantom trainers whose organs are told apart by side."""
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = base.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None
    return configure_rotation_dummyDA_mirroring_and_inital_patch_size
