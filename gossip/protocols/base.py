"""The base every protocol extends, and what it tells the program that runs it.

A protocol gets a context (transport, clock, learner, neighbourhood) and runs rounds. The
program around it, a simulated swarm or a real peer, never asks which protocol it runs: it
reads the answers below instead.

Class attributes (a subclass sets what differs from the default):

====================  =======================================================================
``name``              its ``--algorithm`` name
``label``             one line for result tables
``family``            peers mix only with peers of the same family (default: ``name``)
``own_settings``      settings that only it brings: name -> (type, ``pydantic.Field``); each
                      becomes a flag and a TOML key of every command
``takes``             settings it shares with others, by name, each with why they are not for
                      everyone (or ""): a setting that some protocol takes or owns is refused
                      for every protocol that does neither
``refuses``           common settings it cannot use, each with the reason
``compresses``        what a lossy ``--codec`` compresses: "models" (error feedback by CHOCO or
                      EControl) or "updates" (error feedback by a residual)
``catches_up``        a newcomer starts from a running peer's model and round
                      (``gossip.catchup``); False: it enters the swarm through ``enter``
``rounds_shared``     the peers number their rounds alike (False: each counts its own
                      iterations, and curves follow each peer's latest)
``one_model``         a round ends in one model (an aggregate, a token's), recorded by the
                      peer that holds it; False: every peer records every round
``mixes_neighbours``  it averages with its neighbours on the topology (a spectral gap applies)
``overlay``           what result tables show for the overlay (None: the ``--topology``)
``round_word``        what a round is called in tables ("rounds", "hops", "iterations")
``final_label``       what the reported accuracy is of
``sharpness_aware``   its local steps are SAM's always (with ``sam_rho`` taken: when given)
``pulls``             a peer that accepts no connections can take part (client mode)
``attackers``         the simulator can put attackers among its peers
``holders``           a round has a holder that a ``crash-holder`` fault can take
``real_peers``        why real peers cannot run it (None: they can)
``coordinator``       a peer of its own that the simulator starts besides the swarm's
``stops_serving``     at the end of a real run, stop serving before ``finish``, so that a late
                      message cannot change the model that is evaluated and saved
====================  =======================================================================

Class methods: ``build`` makes one from the run's settings in either world; ``check`` refuses
settings that do not go together; ``for_swarm`` fits the settings to a swarm of known size;
``learning_rate`` may replace the run's schedule; ``check_topology`` refuses a graph it cannot use,
and ``check_model`` a model;
``averages`` says whether its peers average in groups (the world then gives them a ``GroupAveraging``,
``gossip.averaging``); ``combine``, ``describe_overlay`` and
``table_rows`` turn the peers' ``figures`` into a run's summary and its result table.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from gossip.averaging import GroupAveraging
from gossip.exchange import Exchange
from gossip.learner import Learner
from gossip.message import PeerId
from gossip.neighbourhood import Neighbourhood
from gossip.settings import GossipSettings
from gossip.transport import Clock, Transport
from gossip.wait_free import WaitFreeExchange

# The run's settings as a protocol reads them (``peer.config.TrainingConfig``): the settings as
# attributes, each spec already parsed (``gossip``: a GossipSettings), and ``given(name)``, whether
# a setting was given rather than left at its default. A protocol reads the common settings and
# those it ``takes``.
Settings = Any
# The peer id of a protocol's coordinator in a simulation (see ``Protocol.coordinator``).
COORDINATOR = "server"
# Why protocols whose rounds are the swarm's refuse --duration.
ROUNDS_OF_THE_SWARM = "the rounds are the whole swarm's and end together; give --rounds instead of --duration"


@dataclass(frozen=True)
class RoundReport:
    round: int
    train_loss: float
    neighbours_expected: int = 0
    neighbours_heard: int = 0
    exchange_seconds: float = 0.0  # time spent exchanging models this round (clock seconds)
    local_steps: int = 0  # optimisation steps taken this round
    span: int = 1  # rounds this report completes: more than one when the peer jumped ahead to its neighbours'
    last: bool = False  # the peer's last round (the run's end, or its --duration ran out)


@dataclass
class ProtocolContext:
    """Everything a protocol may touch. It never sees whether the world is simulated."""

    transport: Transport
    clock: Clock
    learner: Learner
    neighbourhood: Neighbourhood | None
    # Awaited after every round, once the round's model is final (the runtime evaluates and records it).
    round_finished: Callable[[RoundReport], Awaitable[None]]
    gossip: GossipSettings = field(default_factory=GossipSettings)
    deadline: float | None = None  # clock seconds after which no round starts (None: rounds only)
    # The world's averaging in groups, for a protocol whose ``averages`` says it needs one (else None).
    averaging: GroupAveraging | None = None

    def past_deadline(self) -> bool:
        return self.deadline is not None and self.clock.now() >= self.deadline

    def exchange(self) -> Exchange:
        """A gossip step with the neighbourhood, as ``gossip`` configures it."""
        if self.neighbourhood is None:
            raise ValueError("gossip needs a neighbourhood")
        return self.gossip.exchange(self.transport, self.clock, self.neighbourhood, self.learner.state())

    def wait_free_exchange(self) -> WaitFreeExchange:
        """Gossip without rounds, as ``gossip`` configures it (``gossip.wait_free``)."""
        if self.neighbourhood is None:
            raise ValueError("gossip needs a neighbourhood")
        return self.gossip.wait_free_exchange(self.transport, self.clock, self.neighbourhood, self.learner.state())


class Protocol(ABC):
    name: ClassVar[str]
    label: ClassVar[str] = ""
    family: ClassVar[str] = ""
    own_settings: ClassVar[Mapping[str, tuple[Any, Any]]] = {}
    takes: ClassVar[Mapping[str, str]] = {}
    # What a lossy --codec compresses: whole models ("models": --error-feedback choco or econtrol
    # keeps per-link copies) or updates ("updates": --error-feedback residual sends later what the
    # codec left out).
    compresses: ClassVar[str] = "models"
    refuses: ClassVar[Mapping[str, str]] = {}
    catches_up: ClassVar[bool] = True
    rounds_shared: ClassVar[bool] = True
    one_model: ClassVar[bool] = False
    mixes_neighbours: ClassVar[bool] = True
    overlay: ClassVar[str | None] = None
    round_word: ClassVar[str] = "rounds"
    final_label: ClassVar[str] = "mean"
    sharpness_aware: ClassVar[bool] = False
    pulls: ClassVar[bool] = False
    attackers: ClassVar[bool] = False
    holders: ClassVar[bool] = False
    real_peers: ClassVar[str | None] = None
    coordinator: ClassVar[type[Protocol] | None] = None
    stops_serving: ClassVar[bool] = False

    def __init__(self, context: ProtocolContext):
        self.context = context

    # --- what the program asks of the class -------------------------------------------------

    @classmethod
    def family_name(cls) -> str:
        return cls.family or cls.name

    @classmethod
    def taken(cls) -> dict[str, str]:
        """Every setting it reads beyond the common ones, with why it is not everyone's."""
        return {**dict.fromkeys(cls.own_settings, ""), **cls.takes}

    @classmethod
    def needs_neighbourhood(cls) -> bool:
        """Whether it works on the topology (its peers get a neighbourhood)."""
        return cls.overlay is None

    @classmethod
    def build(
        cls, context: ProtocolContext, settings: Settings, *, peers: list[PeerId], joining: bool
    ) -> Protocol:
        """One peer's protocol for a run with ``settings``. ``peers`` are the swarm's first peers
        where the world knows them (a simulation), or none yet (a real peer learns them in
        ``enter``); ``joining``: the peer joins a run under way. Every registered protocol has one."""
        raise TypeError(f"{cls.__name__} is not built from a run's settings")

    @classmethod
    def check(cls, settings: Settings) -> None:
        """ValueError, saying why, when the settings do not go together for this protocol."""

    @classmethod
    def for_swarm(cls, settings: Settings, peers: int) -> dict[str, Any]:
        """Settings that a swarm of ``peers`` changes (by name); ValueError when it is too small."""
        return {}

    @classmethod
    def check_topology(cls, topology: Any, settings: Settings) -> None:
        """ValueError when the run's graph (a ``topology.Topology``) does not suit it."""

    @classmethod
    def check_model(cls, state: Mapping[str, Any], settings: Settings) -> None:
        """ValueError when the task's model (a state: names to tensors) does not suit the settings."""

    @classmethod
    def averages(cls, settings: Settings) -> bool:
        """Whether its peers average in groups with these settings (``ProtocolContext.averaging``)."""
        return False

    @classmethod
    def learning_rate(cls, settings: Settings, schedule: Any) -> Any:
        """The learning-rate schedule of its local steps; the run's ``schedule`` by default."""
        return schedule

    @classmethod
    def options(cls, settings: Settings) -> dict[str, Any]:
        """Its own settings as a run's summary reports them."""
        return {name: _plain(getattr(settings, name)) for name in sorted(cls.taken())}

    @classmethod
    def combine(cls, figures: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
        """A swarm's figures from its peers' ``figures()``."""
        return {}

    @classmethod
    def describe_overlay(cls, summary: Mapping[str, Any]) -> str:
        """The overlay as the result table shows it."""
        gap, degree = summary.get("spectral_gap"), summary.get("in_degree")
        if gap is None:
            return summary["topology"]
        spread = f"; in-degree {degree['mean']:.2f} ± {degree['std']:.2f}" if degree and degree["std"] else ""
        return f"{summary['topology']} (spectral gap {gap:.4f}{spread})"

    @classmethod
    def table_rows(cls, summary: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Rows of its own for the result table."""
        return []

    # --- what the program asks of a running peer --------------------------------------------

    @abstractmethod
    async def run(self, rounds: int, first_round: int = 0) -> None:
        """Run rounds ``first_round`` .. ``rounds - 1``, reporting each through ``context.round_finished``.

        A peer that joins a running swarm starts at the swarm's round (see ``gossip.catchup``).
        """

    def enter(self, peers: list[PeerId], swarm_round: int) -> None:
        """A real peer's swarm as it found it: the live peers, and the highest round they report
        (0: a new swarm). Called before ``run`` for protocols that do not catch up."""

    def position(self, recorded: int, rounds: int) -> int:
        """The round this peer is at, given the next round it would record."""
        return recorded

    def holds_final_model(self) -> bool:
        """Whether this peer's model is the run's final one although it may not have recorded the
        last round (it was sent the last aggregate, or kept the last token it trained)."""
        return False

    def figures(self) -> dict[str, Any]:
        """This peer's own figures for its summary."""
        return {}

    async def finish(self) -> None:
        """What a real peer does once its run is over, before it saves and leaves."""

    async def leave(self) -> None:
        """Tell the others this peer is going, before it stops (a protocol with no goodbye just stops)."""

    def save_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What a restarted peer needs of this protocol besides its model and round (tensors, and
        JSON-able values), for its checkpoint. Nothing by default: what a protocol holds of its
        neighbours is out of date by the time a killed peer is back, and each protocol already
        renews it for a peer that joins (error-feedback links resync with a full copy, a token
        that went quiet is re-issued by its previous holder)."""
        return {}, {}

    def restore_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Go on from ``save_state()``, before ``run``; ValueError, with nothing changed, when it does not fit."""
        if tensors or meta:
            raise ValueError(f"{self.name} keeps no state in a checkpoint, and this one holds some")


def _plain(value: Any) -> Any:
    """A setting as JSON holds it: a parsed spec by its text."""
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)
