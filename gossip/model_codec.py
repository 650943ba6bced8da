"""A whole model as one flat vector, so that a codec compresses it in one piece.

One vector keeps a message to a few parts whatever the number of layers (for a small model the
header would otherwise outweigh a top-k payload), and lets top-k choose across layers. Only
floating-point tensors are exchanged; integer ones (BatchNorm's batch counter) stay local.
"""

from __future__ import annotations

import functools
import math

import torch

from gossip.codecs import Codec, CodecError, Identity, parse_codec
from gossip.learner import State
from gossip.validation import InvalidState, check_state


@functools.lru_cache(maxsize=64)
def codec_for(spec: str) -> Codec:
    """The codec a received message names; parsing is cheap, but a swarm uses few specs."""
    return parse_codec(spec)


def exchanged(state: State) -> State:
    """The tensors of a state that peers exchange and mix: the floating-point ones."""
    return {name: tensor for name, tensor in state.items() if tensor.is_floating_point()}


class FlatModel:
    """Flattens the exchanged tensors of states laid out like ``reference`` into one vector, and back."""

    def __init__(self, reference: State):
        floating = exchanged(reference)
        self.names = list(floating)
        self.shapes = [tensor.shape for tensor in floating.values()]
        self.dtypes = [tensor.dtype for tensor in floating.values()]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.numel = sum(self.sizes)
        # float32 at least; a float64 model keeps its precision.
        self.dtype = functools.reduce(torch.promote_types, self.dtypes, torch.float32)

    def flatten(self, state: State) -> torch.Tensor:
        return torch.cat([state[name].detach().reshape(-1).to(self.dtype) for name in self.names])

    def unflatten(self, flat: torch.Tensor) -> State:
        pieces = flat.split(self.sizes)
        return {
            name: piece.view(shape).to(dtype)
            for name, piece, shape, dtype in zip(self.names, pieces, self.shapes, self.dtypes)
        }

    def decode(self, codec: Codec, parts: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        """The vector that ``parts`` encode; InvalidState if they are malformed or not finite."""
        try:
            flat = codec.decode(parts, torch.Size([self.numel]), self.dtype, seed)
        except CodecError as reason:
            raise InvalidState(str(reason)) from None
        if not bool(torch.isfinite(flat).all()):
            raise InvalidState("decoded model contains NaN or infinity")
        return flat


class ModelMessages:
    """A model's state as the tensors of a message, through ``codec`` when it is lossy, and back.

    What comes back has been checked against the reference layout (names, shapes, dtypes,
    finite values), so it may be mixed. A receiver decodes with the codec the message names,
    so peers need not agree on one.
    """

    def __init__(self, reference: State, codec: Codec):
        self.codec = codec
        self._reference = {k: v.detach() for k, v in exchanged(reference).items()}
        self.flat = FlatModel(reference)

    def encode(self, state: State, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, int], str]:
        """The tensors, metadata and codec name of a message that carries ``state``."""
        if self.codec.lossless:
            return exchanged(state), {}, Identity.spec
        return self.codec.encode(self.flat.flatten(state), seed), {"seed": seed}, self.codec.spec

    def decode(self, tensors: dict[str, torch.Tensor], codec: str, meta: dict) -> State:
        """The state a message carries; InvalidState when it is malformed or not finite."""
        if codec == Identity.spec:
            check_state(tensors, self._reference)
            return tensors
        seed = meta.get("seed")
        if type(seed) is not int:
            raise InvalidState(f"a {codec} model needs an integer seed, got {seed!r}")
        try:
            decoder = codec_for(codec)
        except CodecError as reason:
            raise InvalidState(str(reason)) from None
        return self.flat.unflatten(self.flat.decode(decoder, tensors, seed))
