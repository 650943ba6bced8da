"""Validated settings of a simulated run; the same keys come from flags or a TOML file (flags win)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range; the message names it."""


class SimulationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    peers: int = Field(16, ge=2, description="number of simulated peers")
    topology: str = Field("ring", description="communication graph")
    algorithm: Literal["dpsgd", "fedavg"] = Field("dpsgd", description="training protocol")
    task: str = Field("mnist1d", description="mnist1d, fashion-mnist or module:function")
    partition: str = Field("dirichlet:0.5", description="iid, dirichlet:ALPHA or shards:K")
    rounds: int = Field(100, ge=1)
    local_steps: int = Field(10, ge=1, description="local optimisation steps per round")
    batch_size: int = Field(32, ge=1)
    lr: float | None = Field(None, gt=0, description="local SGD learning rate; the task's own when not given")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    weights: Literal["metropolis", "uniform"] = Field("metropolis", description="gossip mixing weights")
    seed: int = 0
    data_dir: Path | None = Field(None, description="folder holding the datasets (e.g. ../shared/data)")
    out: Path | None = Field(None, description="folder for metrics.jsonl and summary.json")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = Field(1, ge=1, description="evaluate every N rounds (the last round always)")
    exchange_timeout: float = Field(30.0, gt=0, description="simulated seconds to wait for a neighbour")
    step_time: float = Field(0.01, gt=0, description="simulated seconds per local step")
    link_latency: float = Field(0.01, ge=0, description="simulated one-way latency, seconds")
    link_bandwidth: float = Field(100.0, gt=0, description="simulated link bandwidth, Mbit/s")
    link_loss: float = Field(0.0, ge=0, le=1, description="probability that a message is lost")
    threads: int = Field(1, ge=1, description="torch intra-op threads")


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> SimulationConfig:
    """Defaults, then the config file, then the flags that were given on the command line."""
    try:
        return SimulationConfig(**{**file_values, **flag_values})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown setting {where!r}; see `peer simulate --help` for the valid ones") from None
        raise ConfigError(f"{where.replace('_', '-')}: {first['msg']} (got {first.get('input')!r})") from None
