"""Validated settings of a run; the same keys come from flags or a TOML file (flags win).

Every spec (codec, mixing, schedule, staleness, faults, attackers, speeds, bandwidths) is parsed
once, as the settings are validated, into the typed values that the rest of the program uses
(``gossip``, ``schedule``, ``fault_events``, ``attack``, ``peer_speeds``, ``peer_bandwidths``).
Which settings the chosen protocol takes, refuses or cannot combine is the protocol's to say
(``gossip.protocols.base``): a setting that some protocol takes and this one does not is refused
with the reason, never ignored.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from gossip.choco import ERROR_FEEDBACK_SPECS, default_consensus_step, parse_error_feedback
from gossip.codecs import CodecError, parse_codec
from gossip.mixing import MixingRule, WeightedAverage
from gossip.outer import FEEDBACK_HELP, ErrorFeedback
from gossip.protocols import Protocol, names, protocol_named, registered
from gossip.robust import ROBUST_SPECS, parse_robust
from gossip.settings import GossipSettings
from gossip.variance import TARGETS, VarianceCorrected
from gossip.wait_free import Staleness, parse_staleness
from peer.errors import ConfigError
from peer.lr_schedule import CosineDecay
from peer.sim.byzantine import ByzantineSpec, check_byzantine, parse_byzantine
from peer.sim.faults import Fault, parse_faults
from peer.sim.links import BANDWIDTHS_HELP, Bandwidths, parse_bandwidths
from peer.sim.speeds import SPEEDS_HELP, Speeds, parse_speeds
from topology import TopologyError, check_spec, is_drawn

C = TypeVar("C", bound="TrainingConfig")

__all__ = ["C", "ConfigError", "RunConfig", "SimulationConfig", "SwarmConfig", "TrainingConfig", "build_config", "load_toml"]

# Values that say a setting is not used, which every protocol accepts.
NEUTRAL = {"error_feedback": "none"}
# Settings given through another flag.
FLAG_NAMES = {"adaptive_steps": "--local-steps adaptive:H"}


def flag(name: str) -> str:
    return FLAG_NAMES.get(name, f"--{name.replace('_', '-')}")


def parse_mixing(spec: str) -> MixingRule:
    if spec == "plain":
        return WeightedAverage()
    name, _, target = spec.partition(":")
    if name == "variance-corrected":
        return VarianceCorrected(target or "others")
    robust = parse_robust(spec)
    if robust is not None:
        return robust
    raise ValueError(
        f"bad mixing {spec[:100]!r}; valid: plain, variance-corrected[:TARGET] with TARGET one of {TARGETS}, "
        f"or a robust rule: {ROBUST_SPECS}"
    )


def parse_lr_schedule(spec: str) -> float | None:
    """The fraction of the run after which the rate decays (None: constant); ValueError for a bad spec."""
    if spec == "constant":
        return None
    name, has_start, start = spec.partition(":")
    if name == "cosine":
        try:
            fraction = float(start) if has_start else 0.0
        except ValueError:
            fraction = -1.0
        if 0 <= fraction < 1:
            return fraction
    raise ValueError(f"bad schedule {spec[:100]!r}; valid: constant, cosine, or cosine:START with START in [0, 1)")


def _either(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _unused(protocol: type[Protocol], given: set[str]) -> str | None:
    """Why the first given setting that ``protocol`` does not use is refused, or None."""
    for name in sorted(given & protocol.refuses.keys()):
        return f"{protocol.name}: {protocol.refuses[name]}"
    takers: dict[str, list[type[Protocol]]] = {}
    for other in registered():
        for name in other.taken():
            takers.setdefault(name, []).append(other)
    unused = sorted(name for name in given & takers.keys() if name not in protocol.taken())
    if not unused:
        return None
    # Settings that the same protocols take are refused in one line.
    owners = takers[unused[0]]
    together = [name for name in unused if takers[name] == owners]
    why = owners[0].taken()[unused[0]]
    return (
        f"{', '.join(flag(name) for name in together)}: only for --algorithm {_either([p.name for p in owners])}{why}; "
        f"{protocol.name} does not use {'it' if len(together) == 1 else 'them'}"
    )


class CommonSettings(BaseModel):
    """What every peer needs to train, simulated or real; ``TrainingConfig`` adds the protocols' own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topology: str = Field("ring", description="communication graph")
    algorithm: str = Field(
        "dpsgd", description=f"training protocol: {', '.join(names())}, or module:Class for your own"
    )
    task: str = Field(
        "mnist1d", description="mnist1d, fashion-mnist, cifar10, shakespeare, logistic or module:function for your own"
    )
    partition: str = Field("dirichlet:0.5", description="iid, dirichlet:ALPHA, shards:K or natural (the task's own split)")
    rounds: int = Field(100, ge=1)
    local_steps: int = Field(
        10, ge=1,
        description="local optimisation steps per round; gossip without rounds also takes adaptive:H, H for the fastest peer "
        "and fewer in proportion to speed for the others",
    )
    # Set by --local-steps adaptive:H; not a flag of its own.
    adaptive_steps: bool = Field(False, exclude=True)
    batch_size: int = Field(32, ge=1)
    lr: float | None = Field(None, gt=0, description="local SGD learning rate; the task's own when not given")
    lr_schedule: str = Field(
        "cosine:0.5",
        description="constant, or cosine:START: constant for the first START of the run, then a cosine to 0 at the end",
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0, description="L2 regularisation; the task's own when not given")
    weights: Literal["metropolis", "uniform"] = Field("metropolis", description="gossip mixing weights")
    seed: int = 0
    init: Literal["same", "independent"] = Field(
        "same", description="same: every peer's model is drawn from --seed; independent: each peer draws its own"
    )
    mixing: str = Field(
        "plain",
        description=(
            "plain, variance-corrected[:others|self|conservative:C] (default target: others), or a robust rule: "
            "clipped[:TAU] (self-centred clipping; TAU adapts when not given), trimmed-mean:B or median (per coordinate)"
        ),
    )
    mix_point: Literal["trained", "start"] = Field(
        "trained",
        description="gossip with rounds: the model a peer mixes: trained (x <- W (x + update)) or start, the one it "
        "started the round from, its own update added after (x <- W x + update)",
    )
    gossip_steps: int = Field(
        1, ge=1, le=64, description="gossip steps per round, each a real exchange (with sharpness-aware steps, more than 1 is DFedSAM-MGS)"
    )
    data_dir: Path | None = Field(None, description="folder holding the datasets (e.g. ~/data, which holds fashion-mnist/)")
    download: bool = Field(
        False, description="download a task's missing files into --data-dir (or the cache folder); PEER_DOWNLOAD=1 does too"
    )
    out: Path | None = Field(None, description="folder for metrics.jsonl and summary.json")
    overwrite: bool = Field(False, description="replace the run that --out already holds (without it, such a folder is refused)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = Field(1, ge=1, description="evaluate every N rounds (the last round always)")
    exchange_timeout: float = Field(30.0, gt=0, description="seconds to wait for a neighbour's model")
    codec: str = Field("none", description="compression of what peers send: none, fp16, bf16, int8[:BLOCK], quant:BITS[:CHUNK], topk:RATIO, randk:RATIO, chunktopk:DENSITY:BITS[:CHUNK], or e.g. topk:0.01+int8")
    error_feedback: str | None = Field(
        None, description=f"for models: {ERROR_FEEDBACK_SPECS}; for pseudo-gradients (diloco): {FEEDBACK_HELP}; "
        "choco or residual when --codec is lossy, none otherwise",
    )
    consensus_step: float | None = Field(
        None, gt=0, le=1, description="CHOCO's consensus step size; 1 for dense codecs, less for top-k and random-k"
    )
    threads: int = Field(1, ge=1, description="torch intra-op threads")
    target_accuracy: float | None = Field(
        None, gt=0, le=1, description="report the rounds, bytes and time until the peers' mean test accuracy reached this"
    )
    target_loss: float | None = Field(
        None, gt=0,
        description="report the rounds, bytes and time until the peers' mean test loss fell to this (lower is better)",
    )
    eval_samples: int | None = Field(
        None, ge=1, description="evaluate on a fixed subset of this many test samples, drawn from --seed (default: all)"
    )
    optimizer: Literal["sgd", "adamw"] | None = Field(
        None, description="local optimiser: sgd (with --momentum) or adamw; the task's own when not given"
    )

    duration: float | None = Field(
        None, gt=0,
        description="seconds (simulated, or wall seconds for real peers) after which a peer starts no new round; "
        "gossip protocols only",
    )

    @model_validator(mode="before")
    @classmethod
    def _adaptive_local_steps(cls, data: Any) -> Any:
        """--local-steps adaptive:H is H local steps for the fastest peer, and adaptive steps."""
        if isinstance(data, dict) and isinstance(data.get("local_steps"), str) and data["local_steps"].startswith("adaptive"):
            _, colon, most = data["local_steps"].partition(":")
            if not (colon and most.isdigit() and int(most) >= 1):
                raise ValueError(
                    f"--local-steps {data['local_steps'][:40]!r}: write adaptive:H, H a whole number >= 1 (the fastest peer's steps)"
                )
            data = {**data, "local_steps": int(most), "adaptive_steps": True}
        return data

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, spec: str) -> str:
        try:
            return parse_codec(spec).spec
        except CodecError as error:
            raise ValueError(str(error)) from None

    @field_validator("mixing")
    @classmethod
    def _known_mixing(cls, spec: str) -> str:
        parse_mixing(spec)
        return spec

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, name: str) -> str:
        protocol_named(name)
        return name

    @model_validator(mode="after")
    def _fits_the_protocol(self) -> CommonSettings:
        """The protocol's refusals first, then settings that go together at all."""
        given = set(self.model_fields_set) - {name for name, value in NEUTRAL.items() if getattr(self, name) == value}
        refusal = _unused(self.protocol, given)
        if refusal:
            raise ValueError(refusal)
        if self.target_accuracy is not None and self.target_loss is not None:
            raise ValueError("--target-accuracy and --target-loss: a run has one target; give one of them")
        compresses = self.protocol.compresses
        if self.error_feedback is not None and _feedback_target(self.error_feedback) not in ("", compresses):
            valid = ERROR_FEEDBACK_SPECS if compresses == "models" else FEEDBACK_HELP
            raise ValueError(
                f"--error-feedback {self.error_feedback}: {self.algorithm}'s codec compresses {compresses}, whose error "
                f"feedback is {valid}"
            )
        if is_drawn(self.topology) and self.error_feedback not in (None, "none") and compresses == "models":
            raise ValueError(
                f"--error-feedback {self.error_feedback} keeps a copy of the model on each link, and "
                f"--topology {self.topology} draws new links every round; use --error-feedback none, or a "
                "topology whose links stay (regular:D, base:K)"
            )
        self.gossip  # noqa: B018 - raises ValueError for gossip settings that do not go together
        self.protocol.check(self)
        return self

    def given(self, name: str) -> bool:
        """Whether the setting was given (by a flag or the file), not left at its default."""
        return name in self.model_fields_set

    def with_settings(self: C, **changes: Any) -> C:
        """These settings with ``changes``, validated anew."""
        values = {name: getattr(self, name) for name in self.model_fields_set}
        return type(self)(**{**values, **changes})

    @cached_property
    def protocol(self) -> type[Protocol]:
        return protocol_named(self.algorithm)

    def sharpness_radius(self) -> float:
        """SAM's radius for the local steps: for a sharpness-aware protocol always, for one that
        takes it when given; 0 is plain SGD."""
        protocol = self.protocol
        if protocol.sharpness_aware or ("sam_rho" in protocol.taken() and self.given("sam_rho")):
            return self.sam_rho
        return 0.0

    @field_validator("lr_schedule")
    @classmethod
    def _known_schedule(cls, spec: str) -> str:
        parse_lr_schedule(spec)
        return spec

    @cached_property
    def schedule(self) -> Any:
        """How the rate changes over the local steps (a ``factor(step)``); None for a constant rate."""
        start = parse_lr_schedule(self.lr_schedule)
        total = self.rounds * self.local_steps
        return self.protocol.learning_rate(self, None if start is None else CosineDecay(round(start * total), total))

    @field_validator("topology")
    @classmethod
    def _known_topology(cls, spec: str) -> str:
        # A real peer builds its graph only once it sees the swarm, and falls back to a ring for a
        # size the graph does not exist at: a spec that names no graph at all is refused now.
        try:
            check_spec(spec)
        except TopologyError as error:
            raise ValueError(str(error)) from None
        return spec

    @field_validator("error_feedback")
    @classmethod
    def _known_error_feedback(cls, spec: str | None) -> str | None:
        if spec is not None:
            _feedback_target(spec)
        return spec

    @cached_property
    def error_feedback_spec(self) -> str:
        """The error feedback that runs: the one given, or the protocol's own for a lossy codec."""
        if self.error_feedback is not None:
            return self.error_feedback
        if parse_codec(self.codec).lossless or "error_feedback" not in self.protocol.taken():
            return "none"
        if self.protocol.compresses == "models" and is_drawn(self.topology):
            return "none"  # its copies per link would not outlive a round's draw
        return "choco" if self.protocol.compresses == "models" else "residual"

    @cached_property
    def gossip(self) -> GossipSettings:
        """How models are exchanged and mixed; ValueError for settings that do not go together."""
        codec = parse_codec(self.codec)
        # Error feedback on models keeps a copy per link, updated by both ends at each exchange; on
        # updates it is the protocol's own business.
        feedback = self.error_feedback_spec if self.protocol.compresses == "models" else "none"
        return GossipSettings(
            timeout=self.exchange_timeout,
            codec=codec,
            error_feedback=feedback,
            consensus_step=self.consensus_step or default_consensus_step(codec),
            mixing=parse_mixing(self.mixing),
            staleness=Staleness(parse_staleness(self.staleness), self.max_staleness),
        )


def _feedback_target(spec: str) -> str:
    """What an error feedback spec feeds back into: "models", "updates", or "" for none; ValueError
    naming both kinds' forms for a bad one."""
    if spec == "none":
        return ""
    try:
        if spec.partition(":")[0] == "residual":
            ErrorFeedback.parse(spec)
            return "updates"
        parse_error_feedback(spec)
    except ValueError as error:
        raise ValueError(f"{error}; for models: {ERROR_FEEDBACK_SPECS}; for pseudo-gradients: {FEEDBACK_HELP}") from None
    return "models"


def _protocols_own_settings() -> dict[str, tuple[Any, Any]]:
    """Every registered protocol's own settings, as fields (a setting two protocols share is declared once)."""
    return {name: setting for protocol in registered() for name, setting in protocol.own_settings.items()}


TrainingConfig = create_model(
    "TrainingConfig", __base__=CommonSettings, __module__=__name__, **_protocols_own_settings()
)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fitted(config: C, peers: int) -> C:
    """The settings as a swarm of ``peers`` runs them (see ``Protocol.for_swarm``); ValueError when they
    do not fit it."""
    changes = config.protocol.for_swarm(config, peers)
    return config.with_settings(**changes) if changes else config


def real_peers_run_it(config: TrainingConfig) -> None:
    if config.protocol.real_peers:
        raise ValueError(config.protocol.real_peers)


def _pulling_protocols() -> str:
    return _either([protocol.name for protocol in registered() if protocol.pulls])


class SimulationConfig(TrainingConfig):
    peers: int = Field(
        16, ge=1, description="number of simulated peers; 1 trains one peer on all the data, the reference to compare with"
    )
    eval_peers: int | None = Field(
        None, ge=1,
        description="evaluate this many peers per evaluated round, the same ones each time (drawn from --seed); "
        "every peer at the end; as many as --peers or more evaluates all (default: all peers every time); not for "
        "methods whose round ends in one model",
    )
    engine: Literal["auto", "batched", "per-peer"] = Field(
        "auto",
        description="batched: the peers' local steps run as one vectorised step over their stacked models; per-peer: "
        "each model trains alone; auto: batched when the model allows it and its steps are small (on a CPU, a "
        "step of 0.5 GFLOP or more trains faster alone on every core), per peer (saying why) when not",
    )
    threads: int | None = Field(
        None, ge=1,
        description="threads to compute with: the batched engine splits the peers over them (default: every core "
        "this process may use); the per-peer engine gives them to torch (default: 1, fastest for small models)",
    )
    step_time: float = Field(0.01, gt=0, description="simulated seconds per local step")
    speeds: str = Field("same", description=f"how fast each peer computes: {SPEEDS_HELP}")
    link_latency: float = Field(0.01, ge=0, description="simulated one-way latency, seconds")
    link_bandwidth: float = Field(
        100.0, gt=0,
        description="simulated bandwidth of each peer's uplink and of its downlink, Mbit/s: everything a peer sends "
        "shares its uplink, everything it receives its downlink",
    )
    bandwidths: str = Field(
        "same", description=f"how each peer's link bandwidths vary around --link-bandwidth: {BANDWIDTHS_HELP}"
    )
    link_loss: float = Field(0.0, ge=0, le=1, description="probability that a message is lost")
    plot: bool = Field(False, description="write OUT/run.png, the run's learning curve (needs --out)")
    stop_at_target: bool = Field(
        False, description="end the run once the mean accuracy or loss reaches --target-accuracy or --target-loss"
    )
    faults: str = Field(
        "none",
        description="peers that crash, leave or join (fractions, a count), and partitions from one round to another, "
        "e.g. crash:0.8@30,leave:0.2@20,join:16@40,partition:0.5@50-70",
    )
    byzantine: str = Field(
        "none",
        description="attackers: F:ATTACK, a fraction F of the peers sends crafted models; ATTACK one of signflip, "
        "alie:Z, ipm:EPS, dissensus:EPS, noise:SCALE, huge (e.g. 0.2:alie:1)",
    )

    @field_validator("byzantine")
    @classmethod
    def _known_attack(cls, spec: str) -> str:
        parse_byzantine(spec)
        return spec

    @model_validator(mode="after")
    def _one_peer_trains_alone(self) -> SimulationConfig:
        """--peers 1 is the single-peer reference: settings that need other peers are refused."""
        if self.peers == 1:
            alone = "--peers 1 trains one peer alone on all the data (the reference)"
            if self.faults != "none":
                raise ValueError(f"--faults: {alone}, with no other peer to crash, leave, join or cut off; leave it out")
            if self.byzantine != "none":
                raise ValueError(f"--byzantine: {alone}, with nobody to attack it; leave it out")
            if self.eval_peers is not None and self.eval_peers > 1:
                raise ValueError(f"--eval-peers {self.eval_peers}: {alone}, and evaluates that one; leave it out")
        elif self.eval_peers is not None and self.protocol.one_model:
            raise ValueError(
                f"--eval-peers: {self.algorithm} ends each round in one model, which is evaluated once; "
                "leave it out (it samples the peers of methods in which every peer evaluates its own model)"
            )
        return self

    @cached_property
    def attack(self) -> ByzantineSpec | None:
        return parse_byzantine(self.byzantine)

    @model_validator(mode="after")
    def _attackers_fit(self) -> SimulationConfig:
        if self.attack is not None:
            check_byzantine(
                self.attack, peers=self.peers, algorithm=self.algorithm, attackable=self.protocol.attackers,
                error_feedback=self.gossip.error_feedback, simulated_for=[protocol.name for protocol in registered() if protocol.attackers],
                topology=self.topology,
            )
        return self

    @model_validator(mode="after")
    def _plot_needs_out(self) -> SimulationConfig:
        if self.plot and self.out is None:
            raise ValueError("--plot writes OUT/run.png: give --out DIR too")
        if self.stop_at_target and self.target_accuracy is None and self.target_loss is None:
            raise ValueError("--stop-at-target needs --target-accuracy or --target-loss")
        self.protocol.for_swarm(self, self.peers)
        self.fault_events  # noqa: B018 - parsed now: a bad spec is an error before anything runs
        self.peer_speeds  # noqa: B018
        self.peer_bandwidths  # noqa: B018
        return self

    def compute_threads(self, every_core: bool) -> int:
        """--threads, or its default: every core for the batched engine and for models big enough to use
        them, one for small models trained one by one."""
        return self.threads or (usable_cores() if every_core else 1)

    @cached_property
    def fault_events(self) -> tuple[Fault, ...]:
        holders = [protocol.name for protocol in registered() if protocol.holders]
        return parse_faults(self.faults, rounds=self.rounds, holders=holders, has_holders=self.protocol.holders)

    def newcomers(self) -> int:
        """The peers that --faults brings in during the run."""
        return sum(int(fault.amount) for fault in self.fault_events if fault.kind == "join")

    @cached_property
    def peer_speeds(self) -> Speeds:
        """Each peer's seconds per local step, the newcomers' included."""
        return parse_speeds(self.speeds, self.peers + self.newcomers(), self.step_time, self.seed)

    @cached_property
    def peer_bandwidths(self) -> Bandwidths:
        """Each peer's uplink and downlink, Mbit/s, the newcomers' included."""
        return parse_bandwidths(self.bandwidths, self.peers + self.newcomers(), self.link_bandwidth, self.seed)


BOOTSTRAP_ENV = "PEER_INITIAL_PEERS"


def is_loopback(address: str) -> bool:
    """Whether a multiaddr names a loopback address (/ip4/127.x.x.x/..., /ip6/::1/...)."""
    parts = address.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return False
    try:
        return ipaddress.ip_address(parts[2]).is_loopback
    except ValueError:
        return False


def _is_wildcard(address: str) -> bool:
    """Whether a listen multiaddr names every interface (/ip4/0.0.0.0/..., /ip6/::/...)."""
    parts = address.split("/")
    return len(parts) > 2 and parts[2] in ("0.0.0.0", "::")


def _check_ip(host: str, flag_name: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{flag_name} {host[:100]!r} is not an IP address; give one like 0.0.0.0 (every interface) or 192.0.2.7") from None


def bootstrap_addresses(given: list[str], file: Path | None) -> list[str]:
    """The bootstrap multiaddrs from the flags, a file and the environment variable, each once."""
    found = list(given)
    if file is not None:
        try:
            text = file.read_text()
        except OSError as error:
            raise ValueError(f"--initial-peers-file {file}: cannot be read ({error.strerror or error})") from None
        found += [word for line in text.splitlines() for word in line.partition("#")[0].split()]
    found += os.environ.get(BOOTSTRAP_ENV, "").replace(",", " ").split()
    for address in found:
        if not address.startswith("/") or "/p2p/" not in address:
            raise ValueError(
                f"bootstrap address {address[:200]!r} is not a multiaddr of a peer; give one as a peer prints it, "
                "like /ip4/203.0.113.5/tcp/31337/p2p/QmPeerId..."
            )
    return list(dict.fromkeys(found))


class RunConfig(TrainingConfig):
    """A real peer on the network."""

    initial_peers: list[str] = Field([], description="multiaddrs of any peers of the swarm (none: start a new swarm)")
    initial_peers_file: Path | None = Field(
        None,
        description=f"a file of bootstrap multiaddrs, one per line or space-separated (# starts a comment), added to "
        f"--initial-peers; so is the environment variable {BOOTSTRAP_ENV}",
    )
    host: str | None = Field(
        None,
        description="IP address to listen on: 0.0.0.0 for every interface (default: 127.0.0.1, or 0.0.0.0 when "
        "a bootstrap peer is on another host)",
    )
    port: int = Field(0, ge=0, le=65535, description="TCP port to listen on (0: any free port)")
    host_maddrs: list[str] = Field([], description="multiaddrs to listen on, instead of --host and --port")
    announce_maddrs: list[str] = Field(
        [], description="multiaddrs that others should dial (behind a NAT with a forwarded port); default: the "
        "addresses the peer listens on, without the loopback when it listens on every interface",
    )
    identity: Path | None = Field(None, description="private key file for a persistent peer id (created if missing)")
    swarm: str = Field("gossip", min_length=1, max_length=64, description="name of the swarm to join")
    shard: int = Field(0, ge=0, description="which part of the partition this peer trains on")
    shards: int = Field(1, ge=1, description="how many parts the training set is partitioned into")
    min_peers: int = Field(
        1, ge=1,
        description="wait until this many peers (this one included) have joined and answered this one before training",
    )
    join_timeout: float = Field(60.0, gt=0, description="seconds to wait for --min-peers and for the bootstrap peers")
    record_ttl: float = Field(20.0, ge=2, description="seconds a peer's DHT record lives unless refreshed")
    pace: float = Field(0.0, ge=0, description="minimum seconds per round: a faster peer waits, sparing a shared machine")
    slowdown: float = Field(
        1.0, ge=1, description="make this peer X times slower: after each piece of local work it sleeps X - 1 times as long"
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics"
    )
    metrics_host: str = Field("127.0.0.1", description="address the metrics server listens on (0.0.0.0: every interface)")
    swarm_key: Path | None = Field(
        None, description="a private swarm: only peers holding this key (made by `peer keygen`) may join, send or pull"
    )
    allow_peers: Path | None = Field(None, description="a file of peer ids, one per line: only these may join, send or pull")
    client_mode: bool = Field(
        False,
        description="dial out only and accept no connections (behind a NAT or a firewall): the peer fetches its "
        "neighbours' models, and nobody dials it; needs --initial-peers",
    )
    use_relay: bool = Field(True, description="libp2p circuit relays: reach peers through relays, and relay for others")
    use_auto_relay: bool = Field(
        False, description="behind a NAT, find relays among the reachable peers and become reachable through them"
    )
    checkpoint_every: int = Field(
        0, ge=0,
        description="write a checkpoint to --out every N rounds (iterations without rounds; 0: only at the end)",
    )
    resume: bool = Field(
        False, description="go on from the checkpoint in --out, as the same peer (after a crash, a kill or a stop)"
    )

    @cached_property
    def bootstrap_peers(self) -> list[str]:
        """--initial-peers, then --initial-peers-file's, then the environment's, each once."""
        return bootstrap_addresses(self.initial_peers, self.initial_peers_file)

    @cached_property
    def listen_maddrs(self) -> list[str]:
        """Where the peer listens: --host-maddrs, or --host and --port as a multiaddr."""
        if self.host_maddrs:
            return self.host_maddrs
        host = self.host or ("0.0.0.0" if any(not is_loopback(a) for a in self.bootstrap_peers) else "127.0.0.1")
        return [f"/{'ip6' if ':' in host else 'ip4'}/{host}/tcp/{self.port}"]

    def announced(self, visible: list[str]) -> list[str]:
        """What to announce of the addresses the daemon makes ``visible``: on every interface (and
        without --announce-maddrs), the loopback only where there is nothing else, since a peer on
        another host that dials its own loopback finds itself, not this peer."""
        everywhere = not self.announce_maddrs and any(_is_wildcard(a) for a in self.listen_maddrs)
        outside = [a for a in visible if not is_loopback(a)]
        return (outside or visible) if everywhere else visible

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.host_maddrs and (self.given("host") or self.given("port")):
            raise ValueError("give --host and --port, or --host-maddrs, not both")
        if self.host is not None:
            _check_ip(self.host, "--host")
        self.bootstrap_peers  # noqa: B018 - read now: a missing file or a bad address is an error before anything runs
        if self.shard >= self.shards:
            raise ValueError(f"--shard {self.shard} must be below --shards {self.shards}")
        if self.client_mode:
            if not self.bootstrap_peers:
                raise ValueError(
                    "--client-mode needs --initial-peers: a peer that accepts no connections cannot start a swarm"
                )
            if not self.protocol.pulls or self.gossip.error_feedback != "none":
                raise ValueError(
                    f"--client-mode works with --algorithm {_pulling_protocols()} and --error-feedback none: the others "
                    "deliver models by dialling the peer (sampling, token walks, gossip without rounds) or keep "
                    "per-link copies in step by request and reply"
                )
        if self.resume and self.overwrite:
            raise ValueError("give --resume (go on from the run in --out) or --overwrite (replace it), not both")
        if (self.resume or self.checkpoint_every) and self.out is None:
            flag = "--resume" if self.resume else "--checkpoint-every"
            raise ValueError(f"{flag} needs --out, the folder that holds the run's checkpoint")
        real_peers_run_it(self)
        return self


class SwarmConfig(TrainingConfig):
    """N real peer processes on this host, over loopback."""

    peers: int = Field(4, ge=2, description="number of peer processes")
    out: Path | None = Field(
        None, description="folder for the swarm's summary.json and each peer's peer-I/ (default: a new runs/swarm-DATE-TIME)"
    )
    swarm: str | None = Field(None, max_length=64, description="swarm name (default: a fresh one)")
    join_timeout: float = Field(60.0, gt=0, description="seconds to wait for the peers to find each other")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="peer I serves Prometheus metrics on 127.0.0.1 at port METRICS_PORT + I"
    )
    swarm_key: Path | None = Field(None, description="run a private swarm: every peer holds this key (made by `peer keygen`)")
    speeds: str = Field(
        "same",
        description="how fast each peer computes, as for peer simulate (no jitter): peer I gets --slowdown its step "
        "time over the fastest's",
    )
    client_peers: int = Field(
        0, ge=0, description="the last K peers run in client mode: they accept no connections, as behind a NAT"
    )

    @model_validator(mode="after")
    def _check(self) -> SwarmConfig:
        self.protocol.for_swarm(self, self.peers)
        if self.client_peers >= self.peers:
            raise ValueError(f"--client-peers {self.client_peers} leaves no peer that others can dial; give fewer")
        if self.client_peers and (not self.protocol.pulls or self.gossip.error_feedback != "none"):
            raise ValueError(f"--client-peers works with --algorithm {_pulling_protocols()} and --error-feedback none")
        self.slowdowns()
        if self.metrics_port is not None and self.metrics_port + self.peers - 1 > 65535:
            raise ValueError(f"--metrics-port {self.metrics_port} leaves no port for the last of {self.peers} peers")
        real_peers_run_it(self)
        return self

    def slowdowns(self) -> list[float]:
        """Each peer process's --slowdown, from --speeds."""
        speeds = parse_speeds(self.speeds, self.peers, 1.0, self.seed)
        if speeds.jitter:
            raise ValueError(f"--speeds {self.speeds!r}: real peers vary on their own; leave out +jitter")
        fastest = min(speeds.step_times)
        return [seconds / fastest for seconds in speeds.step_times]


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def build_config(model: type[C], file_values: dict[str, Any], flag_values: dict[str, Any]) -> C:
    """Defaults, then the config file, then the flags that were given on the command line."""
    try:
        return model(**{**file_values, **flag_values})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        if not first["loc"]:  # a check across settings: its message says it all
            raise ConfigError(message) from None
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown setting {where!r}; see --help for the valid ones") from None
        raise ConfigError(f"--{where.replace('_', '-')}: {message} (got {first.get('input')!r})") from None
