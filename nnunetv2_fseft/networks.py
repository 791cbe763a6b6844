"""Build the network nnU-Net would build for a plans/dataset.json pair (with or without a PEFT method)."""
from torch import nn

from .peft import apply_peft


def build_plain_network(plans: dict, configuration: str, dataset_json: dict, deep_supervision: bool = False) -> nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_manager = PlansManager(plans)
    config = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    return get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                  config.network_arch_init_kwargs_req_import,
                                  determine_num_input_channels(plans_manager, config, dataset_json),
                                  label_manager.num_segmentation_heads, allow_init=True,
                                  deep_supervision=deep_supervision)


def build_adapted_network(plans: dict, configuration: str, dataset_json: dict, method: str, options: dict = None,
                          deep_supervision: bool = False) -> nn.Module:
    return apply_peft(build_plain_network(plans, configuration, dataset_json, deep_supervision), method, options)
