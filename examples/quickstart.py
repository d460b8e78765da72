"""Quickstart: a memory-saving reversible block, checked and trained one step."""

import torch
from torch import nn

import invertnet

torch.manual_seed(0)


# Any shape-preserving module becomes invertible inside a coupling.
def make_f() -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


block = invertnet.AdditiveCoupling(Fm=make_f(), Gm=make_f())
assert invertnet.is_invertible_module(block, test_input_shape=(2, 16, 8, 8), atol=1e-5)

# The wrapper frees each block's input after forward and rebuilds it in backward.
model = nn.Sequential(
    *[
        invertnet.InvertibleModuleWrapper(invertnet.AdditiveCoupling(make_f(), make_f()))
        for _ in range(4)
    ]
)
x = torch.randn(2, 16, 8, 8)
loss = model(x).square().mean()
loss.backward()
print(f"loss {loss.item():.4f}; input restored to shape {tuple(x.shape)}")
