"""The networks of memcnn's and momentumnet's experiments, by name.

==============================  ===========================================
names                           what
==============================  ===========================================
resnet32, resnet110, resnet164  memcnn's CIFAR ResNets (pre-activation)
revnet38, revnet110, revnet164  memcnn's CIFAR RevNets (additive couplings)
resnet18/34/101/152             torchvision ResNets with a CIFAR stem
mresnet18/34/101/152            their Momentum ResNet counterparts
mresnet_rings                   MLP Momentum ResNet for the nested rings
==============================  ===========================================
"""

from invertnet.models.cifar_resnet import cifar_resnet, momentum_resnet
from invertnet.models.cifar_revnet import CifarResNet, CifarResNetSpec, memcnn_model
from invertnet.models.registry import ModelEntry, available_models, get_model, model_entry
from invertnet.models.rings import RingsMomentumNet

__all__ = [
    "CifarResNet",
    "CifarResNetSpec",
    "ModelEntry",
    "RingsMomentumNet",
    "available_models",
    "cifar_resnet",
    "get_model",
    "memcnn_model",
    "model_entry",
    "momentum_resnet",
]
