"""A small character-level GPT: a decoder-only transformer in the spirit of nanoGPT's CPU recipe.

Token and position embeddings, pre-LayerNorm blocks of causal self-attention and a 4x-wide GELU
MLP, a final LayerNorm and a linear head that shares the token embedding's weight. No dropout
and no registered buffers: the causal mask is built inside each forward pass, so the batched
engine can run many peers' copies under torch.func.vmap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02  # nanoGPT's initial standard deviation of every weight matrix and embedding


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and the positions before it."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # (batch, heads, length, head width)
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        # A masked softmax written out: F.scaled_dot_product_attention has no batching rule on the
        # CPU, so under vmap it would run peer by peer.
        scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        out = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """Token ids (batch, length <= context) to next-token logits (batch, length, vocab_size)."""

    def __init__(self, vocab_size: int, context: int, layers: int, heads: int, width: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.context = context
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self._initialise(layers)

    def _initialise(self, layers: int) -> None:
        """nanoGPT's: weights normal(0, 0.02), biases zero, and each residual branch's last
        projection scaled by 1/sqrt(2 * layers) so that the residual stream's variance does not
        grow with depth. LayerNorms keep torch's ones and zeros."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.attn.proj, block.proj):
                nn.init.normal_(projection.weight, mean=0.0, std=INIT_STD / math.sqrt(2 * layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[-1]
        if length > self.context:
            raise ValueError(f"input of {length} tokens is longer than the model's context of {self.context}")
        x = self.tokens(ids) + self.positions(torch.arange(length, device=ids.device))
        for block in self.blocks:
            x = block(x)
        # The head is the token embedding itself (weight tying): one matrix, sent and averaged once.
        return F.linear(self.ln(x), self.tokens.weight)


def make_char_gpt(vocab_size: int, context: int = 64, layers: int = 4, heads: int = 4, width: int = 128) -> CharGPT:
    """The character GPT; the defaults (4 layers, 4 heads, width 128, context 64) are nanoGPT's
    CPU recipe for tiny-shakespeare, 809,856 parameters for its 65 characters."""
    return CharGPT(vocab_size, context, layers, heads, width)
