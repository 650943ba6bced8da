"""DFedSAM and DFedSAM-MGS (ALGORITHMS.md section 3; Shi et al., ICML 2023).

Sharpness-aware local steps, then Q gossip steps: Q = 1 is DFedSAM, Q > 1 DFedSAM-MGS. The
round is D-PSGD's with several gossip steps; what differs is the local optimiser, SAM, which
the learner runs (``peer.trainer.Trainer`` with ``sam_rho``).
"""

from __future__ import annotations

from gossip.protocols.dpsgd import DPSGD


class DFedSAM(DPSGD):
    name = "dfedsam"
