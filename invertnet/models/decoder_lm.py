"""A small reversible decoder-only language model.

Token and position embeddings enter both streams of an
:class:`~invertnet.ReversibleSequential` of
:class:`~invertnet.models.transformer.ReversibleDecoderBlock` s (causal
self-attention through :func:`~torch.nn.functional.scaled_dot_product_attention`);
the streams are averaged, normalised and projected onto the vocabulary. Activation
memory is about one block's, whatever the depth.
"""

from __future__ import annotations

import torch
from torch import nn

from invertnet.models.transformer import ReversibleDecoderBlock, run_streams
from invertnet.reversible_sequential import ReversibleSequential

__all__ = ["ReversibleDecoderLM"]


class ReversibleDecoderLM(nn.Module):
    """A reversible GPT-style language model: ``input_ids -> logits``.

    Parameters
    ----------
    vocab_size : int
        Tokens in the vocabulary.
    max_length : int
        Longest sequence (learned positions).
    dim : int
        Width of each stream.
    depth : int
        Reversible decoder blocks.
    heads : int
        Attention heads.
    mlp_ratio, dropout, attention_dropout
        As for :class:`~invertnet.models.transformer.ReversibleDecoderBlock`.
    keep_input, preserve_rng_state, disable
        Passed to the :class:`~invertnet.ReversibleSequential` of the blocks.

    Examples
    --------
    >>> lm = ReversibleDecoderLM(vocab_size=50, max_length=16, dim=16, depth=2, heads=2)
    >>> ids = torch.randint(0, 50, (2, 9))
    >>> lm(ids).shape
    torch.Size([2, 9, 50])
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        dim: int = 256,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        keep_input: bool = False,
        preserve_rng_state: bool = True,
        disable: bool = False,
    ) -> None:
        super().__init__()
        self.max_length = max_length
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_length, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = ReversibleSequential(
            *(
                ReversibleDecoderBlock(dim, heads, mlp_ratio, dropout, attention_dropout)
                for _ in range(depth)
            ),
            split_dim=-1,
            keep_input=keep_input,
            preserve_rng_state=preserve_rng_state,
            disable=disable,
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits ``(batch, length, vocab_size)``.

        Parameters
        ----------
        input_ids : torch.Tensor
            Token ids ``(batch, length)``, ``length <= max_length``.
        attn_mask : torch.Tensor, optional
            Boolean (True: may attend) or additive mask broadcastable to
            ``(batch, heads, length, length)``, such as a padding mask
            ``(batch, 1, 1, length)``; the causal mask is applied in any case.
        """
        length = input_ids.shape[-1]
        if length > self.max_length:
            raise ValueError(
                f"input_ids has {length} tokens, more than max_length={self.max_length}"
            )
        positions = torch.arange(length, device=input_ids.device)
        x = self.drop(self.tokens(input_ids) + self.positions(positions))
        context = {} if attn_mask is None else {"attn_mask": attn_mask}
        return self.lm_head(self.norm(run_streams(self.blocks, x, **context)))
