"""DFedSAM and DFedSAM-MGS (docs/algorithms.md#dfedsam-and-dfedsam-mgs; Shi et al., ICML 2023).

Sharpness-aware local steps, then Q gossip steps: Q = 1 is DFedSAM, Q > 1 DFedSAM-MGS. The
round is D-PSGD's with several gossip steps; what differs is the local optimiser, SAM, which
the learner runs (``peer.trainer.Trainer`` with ``sam_rho``).
"""

from __future__ import annotations

from pydantic import Field

from gossip.protocols.dpsgd import DPSGD


class DFedSAM(DPSGD):
    name = "dfedsam"
    label = "DFedSAM (sharpness-aware local steps, decentralised gossip)"
    own_settings = {
        "sam_rho": (float, Field(
            0.05, gt=0,
            description="dfedsam: radius of the sharpness-aware perturbation; async-gossip: sharpness-aware local "
            "steps with this radius when given",
        )),
    }
    sharpness_aware = True
