"""AlexNet backbones shared by pretraining and evaluation: model, hypercolumn sampling, checkpoints."""
from backbones.alexnet import ACTIVATIONS, AlexNet, AlexNetArch, fold_batchnorm, layer_geometry

__all__ = ["ACTIVATIONS", "AlexNet", "AlexNetArch", "fold_batchnorm", "layer_geometry"]
