"""Tiny dynamic-network-architectures U-Nets for unit tests (the same classes nnU-Net builds)."""
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet


def tiny_unet(kind: str = "plain", dims: int = 3, num_classes: int = 3, deep_supervision: bool = True):
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if dims == 3 else torch.nn.InstanceNorm2d
    kw = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=conv, kernel_sizes=3,
              strides=[1, 2, 2], num_classes=num_classes, n_conv_per_stage_decoder=1, conv_bias=True,
              norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
              deep_supervision=deep_supervision)
    if kind == "plain":
        return PlainConvUNet(n_conv_per_stage=2, **kw)
    return ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2], **kw)
