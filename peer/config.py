"""Validated settings of a simulated run; the same keys come from flags or a TOML file (flags win)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gossip.choco import ERROR_FEEDBACK_SPECS, default_consensus_step, parse_error_feedback
from gossip.codecs import CodecError, parse_codec
from gossip.mixing import MixingRule, WeightedAverage
from gossip.protocols.modest import ModestSettings
from gossip.protocols.srrw import WalkSettings
from gossip.robust import ROBUST_SPECS, parse_robust
from gossip.settings import GossipSettings
from gossip.variance import TARGETS, VarianceCorrected
from gossip.wait_free import STALENESS_HELP, Staleness, parse_staleness
from peer.lr_schedule import CosineDecay, HopDecay, Schedule
from peer.sim.byzantine import check_byzantine, parse_byzantine
from peer.sim.faults import parse_faults
from peer.sim.speeds import SPEEDS_HELP, Speeds, parse_speeds

C = TypeVar("C", bound="TrainingConfig")


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range; the message names it."""


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


class TrainingConfig(BaseModel):
    """What every peer needs to train, simulated or real."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topology: str = Field("ring", description="communication graph")
    algorithm: Literal["dpsgd", "dfedsam", "modest", "fedavg", "srrw", "async-gossip"] = Field(
        "dpsgd", description="training protocol"
    )
    task: str = Field("mnist1d", description="mnist1d, fashion-mnist, logistic or module:function")
    partition: str = Field("dirichlet:0.5", description="iid, dirichlet:ALPHA, shards:K or natural (the task's own split)")
    rounds: int = Field(100, ge=1)
    local_steps: int = Field(
        10, ge=1,
        description="local optimisation steps per round; async-gossip also takes adaptive:H, H for the fastest peer "
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
        description="dpsgd, dfedsam: the model a peer mixes: trained (x <- W (x + update)) or start, the one it "
        "started the round from, its own update added after (x <- W x + update)",
    )
    sam_rho: float = Field(
        0.05, gt=0,
        description="dfedsam: radius of the sharpness-aware perturbation; async-gossip: sharpness-aware local steps "
        "with this radius when given",
    )
    gossip_steps: int = Field(
        1, ge=1, le=64, description="gossip steps per round, each a real exchange (dfedsam: 1 is DFedSAM, more is DFedSAM-MGS)"
    )
    data_dir: Path | None = Field(None, description="folder holding the datasets (e.g. ../shared/data)")
    out: Path | None = Field(None, description="folder for metrics.jsonl and summary.json")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = Field(1, ge=1, description="evaluate every N rounds (the last round always)")
    exchange_timeout: float = Field(30.0, gt=0, description="seconds to wait for a neighbour's model")
    codec: str = Field("none", description="model compression: none, fp16, bf16, int8[:BLOCK], topk:RATIO, randk:RATIO, or e.g. topk:0.01+int8")
    error_feedback: str | None = Field(
        None, description=f"{ERROR_FEEDBACK_SPECS}; choco when --codec is lossy, none otherwise"
    )
    consensus_step: float | None = Field(
        None, gt=0, le=1, description="CHOCO's consensus step size; 1 for dense codecs, less for top-k and random-k"
    )
    threads: int = Field(1, ge=1, description="torch intra-op threads")
    target_accuracy: float | None = Field(
        None, gt=0, le=1, description="report the rounds, bytes and time until the peers' mean test accuracy reached this"
    )

    sample_size: int | None = Field(
        None, ge=1, description="modest: peers that train each round (default 10); fedavg: peers the server samples (default: all)"
    )
    aggregators: int = Field(1, ge=1, description="modest: peers that average each round's models")
    success_fraction: float = Field(
        1.0, gt=0, le=1, description="modest: an aggregator averages once it holds this fraction of the sample's models"
    )
    min_models: int = Field(1, ge=1, description="modest: the fewest models an aggregator averages after its timeout")
    ping_timeout: float = Field(5.0, gt=0, description="modest: seconds to wait for a pong or an acknowledgement")
    aggregation_timeout: float = Field(30.0, gt=0, description="modest: seconds an aggregator waits for the sample's models")
    round_timeout: float = Field(
        120.0, gt=0, description="modest: seconds without word that a round was done before it is handed to others or restarted"
    )
    max_round_rate: float = Field(
        1000.0, gt=0,
        description="modest: rounds a second that others' claims may move a peer's round estimate, past a burst of 100; "
        "keep it above the swarm's own pace",
    )

    alpha: float = Field(5.0, ge=0, description="srrw: how strongly the token avoids peers it visited often; 0 is a plain walk")
    srrw_a: float = Field(
        0.8, gt=0.5, le=1, description="srrw: the visit counts' step size is (n+1)^-A at hop n (A in (0.5, 1])"
    )
    srrw_b: float = Field(
        0.9, gt=0.5, le=1, description="srrw: the model's step size is lr (n+1)^-B at hop n (B in (0.5, 1]; B > A)"
    )
    tokens: int = Field(1, ge=1, description="srrw: tokens walking at once; their models average where two meet")
    srrw_stay: float = Field(
        0.0, ge=0, lt=1, description="srrw: probability that the token stays where it is (a lazy walk: needed on an even ring)"
    )

    staleness: str = Field(
        "poly:0.5", description=f"async-gossip: how a neighbour's model is discounted by its staleness: {STALENESS_HELP}"
    )
    max_staleness: int = Field(
        32, ge=0, description="async-gossip: a neighbour's model more than this many iterations behind ours is not mixed"
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

    @field_validator("staleness")
    @classmethod
    def _known_staleness(cls, spec: str) -> str:
        parse_staleness(spec)
        return spec

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

    @model_validator(mode="after")
    def _compatible_gossip(self) -> TrainingConfig:
        self.gossip_settings()  # raises ValueError for settings that do not go together
        if self.algorithm == "srrw":
            self._check_walk()
        self._check_asynchrony()
        if self.algorithm == "modest":
            if self.error_feedback not in (None, "none"):
                raise ValueError("modest: the peers a model goes to change every round, so there is no error feedback; use --error-feedback none")
            self.modest_settings()
        return self

    def _check_asynchrony(self) -> None:
        """What only gossip without rounds uses is refused elsewhere, and what it cannot use is refused there."""
        if "mix_point" in self.model_fields_set and self.algorithm not in ("dpsgd", "dfedsam"):
            raise ValueError(
                f"--mix-point: {self.algorithm} has no such choice (async-gossip always mixes the model a peer started from)"
            )
        if self.algorithm != "async-gossip":
            given = [f"--{name.replace('_', '-')}" for name in ("staleness", "max_staleness") if name in self.model_fields_set]
            if self.adaptive_steps:
                given.append("--local-steps adaptive:H")
            if given:
                raise ValueError(f"{', '.join(given)}: only for --algorithm async-gossip, whose peers do not share rounds")
            if self.duration is not None and self.algorithm not in ("dpsgd", "dfedsam"):
                raise ValueError(
                    f"--duration: {self.algorithm}'s rounds are the whole swarm's and end together; give --rounds instead"
                )
            return
        if self.error_feedback not in (None, "none"):
            raise ValueError(
                "async-gossip: error feedback keeps per-link copies that both ends update at the same exchange, "
                "which peers without rounds never share; use --error-feedback none"
            )
        if self.gossip_steps != 1:
            raise ValueError("async-gossip: a peer mixes once per iteration with what it holds; --gossip-steps is for rounds")

    def _check_walk(self) -> None:
        """What a walking token has no use for is refused, with the reason."""
        if not parse_codec(self.codec).lossless:
            raise ValueError(
                "srrw: a token's model would lose precision at every hop with nothing to correct it; use --codec none"
            )
        if self.mixing != "plain":
            raise ValueError("srrw: tokens that meet average their models plainly; --mixing applies to gossip, use plain")
        if self.gossip_steps != 1:
            raise ValueError("srrw: a token is handed on once per visit; --gossip-steps applies to gossip")
        if "lr_schedule" in self.model_fields_set:
            raise ValueError("srrw: the step size is lr (n+1)^-B at hop n (see --srrw-b), not --lr-schedule")

    def sharpness_radius(self) -> float:
        """SAM's radius for the local steps: DFedSAM's always, asynchronous gossip's when asked for; 0 is plain SGD."""
        if self.algorithm == "dfedsam" or (self.algorithm == "async-gossip" and "sam_rho" in self.model_fields_set):
            return self.sam_rho
        return 0.0

    def walk_settings(self) -> WalkSettings:
        return WalkSettings(
            alpha=self.alpha, gamma_exponent=self.srrw_a, beta_exponent=self.srrw_b, tokens=self.tokens,
            stay=self.srrw_stay, patience=self.exchange_timeout,
        )

    def modest_settings(self) -> ModestSettings:
        return ModestSettings(
            sample_size=self.sample_size or 10,
            aggregators=self.aggregators,
            success_fraction=self.success_fraction,
            min_models=self.min_models,
            ping_timeout=self.ping_timeout,
            aggregation_timeout=self.aggregation_timeout,
            round_timeout=self.round_timeout,
            max_round_rate=self.max_round_rate,
        )

    @field_validator("lr_schedule")
    @classmethod
    def _known_schedule(cls, spec: str) -> str:
        parse_lr_schedule(spec)
        return spec

    def learning_rate_schedule(self) -> Schedule | None:
        """How the rate changes over the local steps; None for a constant rate."""
        if self.algorithm == "srrw":
            return HopDecay(self.local_steps, self.srrw_b)
        start = parse_lr_schedule(self.lr_schedule)
        total = self.rounds * self.local_steps
        return None if start is None else CosineDecay(round(start * total), total)

    @field_validator("error_feedback")
    @classmethod
    def _known_error_feedback(cls, spec: str | None) -> str | None:
        if spec is not None:
            parse_error_feedback(spec)
        return spec

    def gossip_settings(self) -> GossipSettings:
        codec = parse_codec(self.codec)
        # Error feedback keeps a copy per link, updated by both ends at each exchange; MoDeST's links
        # change every round, a token has no links, and peers without rounds share no exchanges.
        default_feedback = "none" if codec.lossless or self.algorithm in ("modest", "srrw", "async-gossip") else "choco"
        return GossipSettings(
            timeout=self.exchange_timeout,
            codec=codec.spec,
            error_feedback=self.error_feedback or default_feedback,
            consensus_step=self.consensus_step or default_consensus_step(codec),
            mixing=parse_mixing(self.mixing),
            staleness=Staleness(parse_staleness(self.staleness), self.max_staleness),
        )


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_swarm_size(config: TrainingConfig, peers: int) -> None:
    if config.sample_size is not None and config.sample_size > peers:
        raise ValueError(f"--sample-size {config.sample_size} is larger than the swarm of --peers {peers}")
    if config.algorithm == "srrw" and config.tokens > peers:
        raise ValueError(f"--tokens {config.tokens} is more than the {peers} peers they would walk between")


class SimulationConfig(TrainingConfig):
    peers: int = Field(16, ge=2, description="number of simulated peers")
    engine: Literal["auto", "batched", "per-peer"] = Field(
        "auto",
        description="batched: the peers' local steps run as one vectorised step over their stacked models; per-peer: "
        "each model trains alone; auto: batched when the model allows it, per peer (saying why) when not",
    )
    threads: int | None = Field(
        None, ge=1,
        description="threads to compute with: the batched engine splits the peers over them (default: every core "
        "this process may use); the per-peer engine gives them to torch (default: 1, fastest for small models)",
    )
    step_time: float = Field(0.01, gt=0, description="simulated seconds per local step")
    speeds: str = Field("same", description=f"how fast each peer computes: {SPEEDS_HELP}")
    link_latency: float = Field(0.01, ge=0, description="simulated one-way latency, seconds")
    link_bandwidth: float = Field(100.0, gt=0, description="simulated link bandwidth, Mbit/s")
    link_loss: float = Field(0.0, ge=0, le=1, description="probability that a message is lost")
    plot: bool = Field(False, description="write OUT/run.png, the run's learning curve (needs --out)")
    stop_at_target: bool = Field(False, description="end the run once the mean accuracy reaches --target-accuracy")
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
    def _attackers_fit(self) -> SimulationConfig:
        spec = parse_byzantine(self.byzantine)
        if spec is not None:
            feedback = self.gossip_settings().error_feedback
            check_byzantine(spec, peers=self.peers, algorithm=self.algorithm, error_feedback=feedback)
        return self

    @model_validator(mode="after")
    def _plot_needs_out(self) -> SimulationConfig:
        if self.plot and self.out is None:
            raise ValueError("--plot writes OUT/run.png: give --out DIR too")
        if self.stop_at_target and self.target_accuracy is None:
            raise ValueError("--stop-at-target needs --target-accuracy")
        check_swarm_size(self, self.peers)
        parse_faults(self.faults, rounds=self.rounds, algorithm=self.algorithm)
        self.peer_speeds()
        return self

    def compute_threads(self, batched: bool) -> int:
        """--threads, or its default for the engine that trains the peers."""
        return self.threads or (usable_cores() if batched else 1)

    def newcomers(self) -> int:
        """The peers that --faults brings in during the run."""
        faults = parse_faults(self.faults, rounds=self.rounds, algorithm=self.algorithm)
        return sum(int(fault.amount) for fault in faults if fault.kind == "join")

    def peer_speeds(self) -> Speeds:
        """Each peer's seconds per local step, the newcomers' included."""
        return parse_speeds(self.speeds, self.peers + self.newcomers(), self.step_time, self.seed)


class RunConfig(TrainingConfig):
    """A real peer on the network."""

    initial_peers: list[str] = Field([], description="multiaddrs of any peers of the swarm (none: start a new swarm)")
    host_maddrs: list[str] = Field(["/ip4/127.0.0.1/tcp/0"], description="multiaddrs to listen on")
    announce_maddrs: list[str] = Field([], description="multiaddrs that others should dial (behind NAT, on 0.0.0.0)")
    identity: Path | None = Field(None, description="private key file for a persistent peer id (created if missing)")
    swarm: str = Field("gossip", min_length=1, max_length=64, description="name of the swarm to join")
    shard: int = Field(0, ge=0, description="which part of the partition this peer trains on")
    shards: int = Field(1, ge=1, description="how many parts the training set is partitioned into")
    min_peers: int = Field(1, ge=1, description="wait until this many peers are live before training")
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
        description="write a checkpoint to --out every N rounds (iterations for async-gossip; 0: only at the end)",
    )
    resume: bool = Field(
        False, description="go on from the checkpoint in --out, as the same peer (after a crash, a kill or a stop)"
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.shard >= self.shards:
            raise ValueError(f"--shard {self.shard} must be below --shards {self.shards}")
        if self.client_mode:
            if not self.initial_peers:
                raise ValueError(
                    "--client-mode needs --initial-peers: a peer that accepts no connections cannot start a swarm"
                )
            if self.algorithm not in ("dpsgd", "dfedsam") or self.gossip_settings().error_feedback != "none":
                raise ValueError(
                    "--client-mode works with --algorithm dpsgd or dfedsam and --error-feedback none: the others "
                    "deliver models by dialling the peer (sampling, token walks, gossip without rounds) or keep "
                    "per-link copies in step by request and reply"
                )
        if (self.resume or self.checkpoint_every) and self.out is None:
            flag = "--resume" if self.resume else "--checkpoint-every"
            raise ValueError(f"{flag} needs --out, the folder that holds the run's checkpoint")
        if self.algorithm == "fedavg":
            raise ValueError("fedavg needs a central server and is offered by `peer simulate` only; use --algorithm dpsgd")
        return self


class SwarmConfig(TrainingConfig):
    """N real peer processes on this host, over loopback."""

    peers: int = Field(4, ge=2, description="number of peer processes")
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
        check_swarm_size(self, self.peers)
        if self.client_peers >= self.peers:
            raise ValueError(f"--client-peers {self.client_peers} leaves no peer that others can dial; give fewer")
        if self.client_peers and (self.algorithm not in ("dpsgd", "dfedsam") or self.gossip_settings().error_feedback != "none"):
            raise ValueError("--client-peers works with --algorithm dpsgd or dfedsam and --error-feedback none")
        self.slowdowns()
        if self.metrics_port is not None and self.metrics_port + self.peers - 1 > 65535:
            raise ValueError(f"--metrics-port {self.metrics_port} leaves no port for the last of {self.peers} peers")
        if self.algorithm == "fedavg":
            raise ValueError("fedavg needs a central server and is offered by `peer simulate` only; use --algorithm dpsgd")
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
