"""Vision Transformers: the reversible RevViT and the ViT it is compared with.

:class:`RevViT` (Mangalam et al., CVPR 2022) runs
:class:`~invertnet.models.transformer.ReversibleTransformerBlock` s in an
:class:`~invertnet.ReversibleSequential`: the patch embedding enters both streams,
and the two streams are averaged after the last block. Its activation memory is
about one block's, whatever the depth. :class:`ViT` has the same embedding, the
same branches per block (attention, MLP) and the same head, applied as ordinary
pre-norm residual blocks, optionally under :func:`torch.utils.checkpoint.checkpoint`
per block: the baselines of ``invertnet bench --workloads revvit``.

Both pool the tokens by their mean (no class token), which keeps every block a map
of the same token set.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from invertnet.models.transformer import (
    ReversibleTransformerBlock,
    TransformerBlock,
    run_streams,
)
from invertnet.reversible_sequential import ReversibleSequential

__all__ = ["PatchEmbedding", "RevViT", "ViT"]


class PatchEmbedding(nn.Module):
    """Cut an image into square patches, embed each linearly and add learned positions.

    Parameters
    ----------
    image_size : int
        Height and width of the input images.
    patch_size : int
        Side of a patch; must divide ``image_size``.
    in_channels : int
        Image channels.
    dim : int
        Token width.
    dropout : float
        Dropout on the embedded tokens.
    """

    def __init__(
        self, image_size: int, patch_size: int, in_channels: int, dim: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(
                f"patch_size must divide image_size={image_size}, got patch_size={patch_size}"
            )
        self.image_size = image_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        tokens = (image_size // patch_size) ** 2
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.drop = nn.Dropout(dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens ``(batch, patches, dim)`` of images ``(batch, channels, size, size)``."""
        if images.dim() != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (batch, channels, {self.image_size}, "
                f"{self.image_size}), got {tuple(images.shape)}"
            )
        return self.drop(self.proj(images).flatten(2).transpose(1, 2) + self.position)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class _Classifier(nn.Module):
    """What ViT and RevViT share: the embedding before and the head after the blocks."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        num_classes: int,
        dim: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.embed = PatchEmbedding(image_size, patch_size, in_channels, dim, dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(tokens).mean(dim=1))


class RevViT(_Classifier):
    """A reversible Vision Transformer for image classification.

    Parameters
    ----------
    image_size : int
        Input height and width (32 for CIFAR).
    patch_size : int
        Patch side (4 gives 64 tokens at 32x32).
    in_channels : int
        Image channels.
    num_classes : int
        Output classes.
    dim : int
        Width of each of the two streams.
    depth : int
        Reversible blocks.
    heads : int
        Attention heads.
    mlp_ratio : float
        MLP hidden width in multiples of ``dim``.
    dropout, attention_dropout : float
        As for :class:`~invertnet.models.transformer.ReversibleTransformerBlock`;
        dropout is replayed exactly in backward.
    keep_input, preserve_rng_state, disable
        Passed to the :class:`~invertnet.ReversibleSequential` of the blocks
        (``disable=True`` trains with plain autograd).

    Examples
    --------
    >>> net = RevViT(image_size=8, patch_size=4, dim=16, depth=2, heads=2)
    >>> net(torch.randn(3, 3, 8, 8)).shape
    torch.Size([3, 10])
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        keep_input: bool = False,
        preserve_rng_state: bool = True,
        disable: bool = False,
    ) -> None:
        super().__init__(image_size, patch_size, in_channels, num_classes, dim, dropout)
        self.blocks = ReversibleSequential(
            *(
                ReversibleTransformerBlock(dim, heads, mlp_ratio, dropout, attention_dropout)
                for _ in range(depth)
            ),
            split_dim=-1,
            keep_input=keep_input,
            preserve_rng_state=preserve_rng_state,
            disable=disable,
        )
        _init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits for images ``(batch, channels, image_size, image_size)``."""
        return self._logits(run_streams(self.blocks, self.embed(images)))


class ViT(_Classifier):
    """The Vision Transformer with :class:`RevViT`'s blocks applied as residual blocks.

    Parameters
    ----------
    image_size, patch_size, in_channels, num_classes : int
        As for :class:`RevViT`.
    dim, depth, heads : int
        As for :class:`RevViT`.
    mlp_ratio, dropout, attention_dropout : float
        As for :class:`RevViT`.
    checkpoint_blocks : bool
        While training, run each block under
        :func:`torch.utils.checkpoint.checkpoint` (``use_reentrant=False``): only the
        blocks' inputs are kept, and each block runs again in backward.

    Examples
    --------
    >>> net = ViT(image_size=8, patch_size=4, dim=16, depth=2, heads=2, checkpoint_blocks=True)
    >>> net(torch.randn(3, 3, 8, 8)).shape
    torch.Size([3, 10])
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        checkpoint_blocks: bool = False,
    ) -> None:
        super().__init__(image_size, patch_size, in_channels, num_classes, dim, dropout)
        self.checkpoint_blocks = checkpoint_blocks
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, dropout, attention_dropout)
            for _ in range(depth)
        )
        _init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits for images ``(batch, channels, image_size, image_size)``."""
        x = self.embed(images)
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self._logits(x)
