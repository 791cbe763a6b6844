"""Parameter-efficient fine-tuning for dynamic-network-architectures U-Nets (pure torch, no nnU-Net trainer)."""
from .methods import (METHODS, apply_peft, count_parameters, get_method, is_mergeable, merge_peft,
                      resolved_options, trainable_state)
from .tree import foundation_key

__all__ = ["METHODS", "apply_peft", "count_parameters", "get_method", "is_mergeable", "merge_peft",
           "resolved_options", "trainable_state", "foundation_key"]
