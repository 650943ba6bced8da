"""The unit that peers exchange, and its exact size on the wire.

A message is a small header (kind, sender, round, a table of tensors, scalar metadata)
followed by the raw bytes of its tensors. The header is msgpack; tensors never go through
pickle. ``wire_size`` is what a transport counts, so simulated and real byte counts agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import torch

WIRE_FORMAT_VERSION = 1
# A 4-byte big-endian header length precedes the msgpack header on the wire.
HEADER_LENGTH_PREFIX = 4

PeerId = str
Scalar = int | float | str | bool


@dataclass(frozen=True)
class Message:
    """A protocol message. Receivers must treat ``tensors`` as read-only."""

    kind: str
    sender: PeerId
    round: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Scalar] = field(default_factory=dict)
    codec: str = "none"

    def header(self) -> dict:
        return {
            "v": WIRE_FORMAT_VERSION,
            "kind": self.kind,
            "sender": self.sender,
            "round": self.round,
            "codec": self.codec,
            "tensors": [
                [name, str(t.dtype).removeprefix("torch."), list(t.shape), t.numel() * t.element_size()]
                for name, t in self.tensors.items()
            ],
            "meta": self.meta,
        }

    def payload_size(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def wire_size(self) -> int:
        """Bytes this message occupies on the wire: length prefix, header and tensor data."""
        header = msgpack.packb(self.header(), use_bin_type=True)
        return HEADER_LENGTH_PREFIX + len(header) + self.payload_size()
