"""A peer of the gossip training system: tasks, local training and its gossip loop.

- ``cli.py``: the ``peer`` command line (simulate, run, swarm, status, plot, keygen).
- ``config.py``: validated settings from flags or a TOML file, shared by every command.
- ``errors.py``: ``ConfigError``, the one-line error every user-facing check raises.
- ``simulate.py``: ``peer simulate``: many peers in one process on an emulated network and a virtual clock.
- ``runtime.py``: one running peer: a trainer and a protocol wired to a transport and a clock, with its metrics.
- ``trainer.py``: local training (SGD with momentum or AdamW, SAM, batch augmentation) and evaluation, with
  rollback to the last finite model.
- ``flops.py``: the FLOPs of a training step and the machine's matrix-product rate, which the engine choice and
  the benchmarks compare.
- ``lr_schedule.py``: the learning rate per local step: cosine decay (a protocol may bring its own).
- ``checkpoint.py``: a real peer's checkpoint, written atomically and read back whole or refused.
- ``metrics.py``: per-round records (metrics.jsonl), the summary file, and consensus distance per round.
- ``summary.py``: a run's summary in one shape for ``peer simulate``, ``peer run`` and ``peer swarm``.
- ``curve.py``: a run's learning curve from its records, and the time to a target accuracy or loss.
- ``runs.py``: reading a run folder back: its summary and its curve.
- ``plot.py``: ``peer plot``: learning curves side by side, and a topology with its spectral gap.
- ``tasks/``: datasets, models and partitions across peers.
- ``sim/``: the simulated world: virtual-time loop, emulated network, faults, attackers, speeds, batched training.
- ``net/``: the real world: libp2p transport, DHT membership, ``peer run``, ``peer swarm``, ``peer status``.
"""
