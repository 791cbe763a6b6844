"""nnU-Net v2 plugin: foundation pre-training with partial labels and few-shot parameter-efficient fine-tuning."""
__version__ = "0.1.0"
