"""Reversible Transformer blocks: attention as ``F``, the MLP as ``G`` of an additive coupling.

A pre-norm Transformer block computes ``x + attention(norm(x))`` then
``x + mlp(norm(x))``. Its reversible form (Gomez et al., 2017; Reformer, Kitaev et
al., 2020; RevViT, Mangalam et al., 2022) keeps two streams ``(x1, x2)`` and
applies the same two residual branches as an additive coupling::

    y1 = x1 + F(x2)      F = attention(norm(.))
    y2 = x2 + G(y1)      G = mlp(norm(.))

so that ``x2 = y2 - G(y1)`` and ``x1 = y1 - F(x2)``: a block's input is rebuilt
from its output, and a stack of them keeps the activations of about one block
whatever its depth. Each stream has the model's full width: a RevViT of width
``dim`` carries two ``dim``-wide streams, with the same weights per block as a ViT
of width ``dim``.

The blocks are :class:`~invertnet.AdditiveCoupling` modules over the last
dimension. Put them in an :class:`~invertnet.ReversibleSequential` with
``split_dim=-1``; an attention mask given to the stack (``attn_mask=``) reaches
every block's attention, and with it the recomputation in backward. Dropout is
replayed exactly, since the wrapper restores each block's random state.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from invertnet.couplings import AdditiveCoupling

__all__ = [
    "AttentionBranch",
    "MLPBranch",
    "ReversibleDecoderBlock",
    "ReversibleTransformerBlock",
    "SelfAttention",
    "TransformerBlock",
    "run_streams",
]


def _check_width(dim: int, heads: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or dim % heads:
        raise ValueError(f"heads must be a positive int that divides dim={dim}, got {heads!r}")


def _with_causal(mask: torch.Tensor, length: int) -> torch.Tensor:
    """``mask`` (boolean: True attends; or additive floats) with the future masked too."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def run_streams(stack: nn.Module, tokens: torch.Tensor, **context: torch.Tensor) -> torch.Tensor:
    """Run a two-stream ``stack`` with ``tokens`` entering both streams, and return the
    streams' average, as RevViT fuses them.

    The second stream is a copy, so that the first block may free each of its inputs
    on its own (the same tensor passed twice would be kept). ``context`` (an
    attention mask) goes to every block.
    """
    y1, y2 = stack(tokens, tokens.clone(), **context)
    return (y1 + y2) / 2


class SelfAttention(nn.Module):
    """Multi-head self-attention through :func:`torch.nn.functional.scaled_dot_product_attention`.

    Parameters
    ----------
    dim : int
        Token width.
    heads : int
        Attention heads (dividing ``dim``).
    dropout : float
        Dropout on the output projection.
    attention_dropout : float
        Dropout on the attention weights (inside the fused attention kernel).
    causal : bool
        Each position attends to itself and earlier positions only.

    Examples
    --------
    >>> attention = SelfAttention(8, heads=2, causal=True)
    >>> attention(torch.randn(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        _check_width(dim, heads)
        self.heads = heads
        self.causal = causal
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over the tokens of ``x`` ``(batch, length, dim)``.

        ``attn_mask`` is boolean (True: may attend) or additive, broadcastable to
        ``(batch, heads, length, length)``, as
        :func:`~torch.nn.functional.scaled_dot_product_attention` takes it.
        """
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        causal = self.causal
        if causal and attn_mask is not None:
            attn_mask, causal = _with_causal(attn_mask, length), False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=causal,
        )
        return self.drop(self.proj(out.transpose(1, 2).reshape(batch, length, dim)))


class AttentionBranch(nn.Module):
    """``attention(norm(x))``: the ``F`` of a reversible Transformer block."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        causal: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attention = SelfAttention(dim, heads, dropout, attention_dropout, causal)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attention(self.norm(x), attn_mask=attn_mask)


class MLPBranch(nn.Module):
    """``mlp(norm(x))``, two linear layers with GELU: the ``G`` of a reversible block.

    It takes ``attn_mask=`` and ignores it: a coupling hands its context keywords to
    both of its branches.
    """

    def __init__(
        self, dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0, norm_eps: float = 1e-6
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"mlp_ratio must give a hidden width >= 1, got {mlp_ratio!r}")
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        del attn_mask  # the MLP acts on each token alone
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.norm(x))))))


class ReversibleTransformerBlock(AdditiveCoupling):
    """A reversible pre-norm Transformer block on two token streams.

    ``y1 = x1 + attention(norm(x2))``, ``y2 = x2 + mlp(norm(y1))``: an
    :class:`~invertnet.AdditiveCoupling` over the last dimension, whose ``Fm`` is
    an :class:`AttentionBranch` and ``Gm`` an :class:`MLPBranch`.

    Parameters
    ----------
    dim : int
        Width of each stream.
    heads : int
        Attention heads.
    mlp_ratio : float
        Hidden width of the MLP, in multiples of ``dim``.
    dropout : float
        Dropout after the attention projection and in the MLP.
    attention_dropout : float
        Dropout on the attention weights.
    causal : bool
        Causal self-attention (a decoder block).
    norm_eps : float
        Layer-norm epsilon.

    Examples
    --------
    >>> import invertnet
    >>> stack = invertnet.ReversibleSequential(
    ...     *(ReversibleTransformerBlock(16, heads=2, dropout=0.1) for _ in range(3)),
    ...     split_dim=-1,
    ... )
    >>> tokens = torch.randn(2, 7, 16, requires_grad=True)
    >>> y1, y2 = stack(tokens, tokens * 1)  # two streams of width 16
    >>> (y1 + y2).sum().backward()
    >>> tokens.grad.shape
    torch.Size([2, 7, 16])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        causal: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__(
            AttentionBranch(dim, heads, dropout, attention_dropout, causal, norm_eps),
            MLPBranch(dim, mlp_ratio, dropout, norm_eps),
            split_dim=-1,
        )


class ReversibleDecoderBlock(ReversibleTransformerBlock):
    """A reversible decoder-only language-model block: causal self-attention and an MLP.

    :class:`ReversibleTransformerBlock` with ``causal=True``: attention through
    :func:`~torch.nn.functional.scaled_dot_product_attention` with
    ``is_causal=True`` (a fused causal kernel), or, given ``attn_mask=`` (padding,
    say), that mask with the future masked as well.

    Parameters
    ----------
    dim, heads, mlp_ratio, dropout, attention_dropout, norm_eps
        As for :class:`ReversibleTransformerBlock`.

    Examples
    --------
    >>> block = ReversibleDecoderBlock(8, heads=2)
    >>> x1, x2 = torch.randn(2, 2, 5, 8).unbind(0)
    >>> y1, y2 = block(x1, x2)
    >>> # Token 0's output does not depend on later tokens.
    >>> later = x2.clone(); later[:, 1:] += 1
    >>> torch.allclose(block(x1, later)[0][:, 0], y1[:, 0])
    True
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__(dim, heads, mlp_ratio, dropout, attention_dropout, True, norm_eps)


class TransformerBlock(nn.Module):
    """The ordinary pre-norm block with the same branches: ``x + F(x)``, then ``+ G``.

    The non-reversible counterpart of :class:`ReversibleTransformerBlock` (same
    parameters), for a ViT to compare a RevViT with.

    Parameters
    ----------
    dim, heads, mlp_ratio, dropout, attention_dropout, causal, norm_eps
        As for :class:`ReversibleTransformerBlock`.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        causal: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.Fm = AttentionBranch(dim, heads, dropout, attention_dropout, causal, norm_eps)
        self.Gm = MLPBranch(dim, mlp_ratio, dropout, norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.Fm(x, attn_mask=attn_mask)
        return x + self.Gm(x)
