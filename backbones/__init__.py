"""AlexNet backbones shared by pretraining and evaluation: model, hypercolumn sampling, checkpoints,
Krähenbühl et al.'s rescaling (backbones.rescale) and the info / features tools."""
from backbones.alexnet import ACTIVATIONS, AlexNet, AlexNetArch, fold_batchnorm, layer_geometry

__all__ = ["ACTIVATIONS", "AlexNet", "AlexNetArch", "fold_batchnorm", "layer_geometry"]
