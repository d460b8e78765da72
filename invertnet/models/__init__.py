"""The networks of memcnn's and momentumnet's experiments and reversible Transformers.

==============================  ===========================================
names                           what
==============================  ===========================================
resnet32, resnet110, resnet164  memcnn's CIFAR ResNets (pre-activation)
revnet38, revnet110, revnet164  memcnn's CIFAR RevNets (additive couplings)
resnet18/34/101/152             torchvision ResNets with a CIFAR stem
mresnet18/34/101/152            their Momentum ResNet counterparts
mresnet_rings                   MLP Momentum ResNet for the nested rings
revvit, vit                     a reversible Vision Transformer and its ViT
==============================  ===========================================

The reversible Transformer blocks (:mod:`invertnet.models.transformer`) and the
reversible decoder-only language model (:class:`ReversibleDecoderLM`) build on
:class:`~invertnet.ReversibleSequential`.
"""

from invertnet.models.cifar_resnet import cifar_resnet, momentum_resnet
from invertnet.models.cifar_revnet import CifarResNet, CifarResNetSpec, memcnn_model
from invertnet.models.decoder_lm import ReversibleDecoderLM
from invertnet.models.registry import ModelEntry, available_models, get_model, model_entry
from invertnet.models.rings import RingsMomentumNet
from invertnet.models.transformer import (
    ReversibleDecoderBlock,
    ReversibleTransformerBlock,
    TransformerBlock,
)
from invertnet.models.vit import RevViT, ViT

__all__ = [
    "CifarResNet",
    "CifarResNetSpec",
    "ModelEntry",
    "RevViT",
    "ReversibleDecoderBlock",
    "ReversibleDecoderLM",
    "ReversibleTransformerBlock",
    "RingsMomentumNet",
    "TransformerBlock",
    "ViT",
    "available_models",
    "cifar_resnet",
    "get_model",
    "memcnn_model",
    "model_entry",
    "momentum_resnet",
]
