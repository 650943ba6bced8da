"""Tests of the gossip node. Most run in this process (the simulator, in-memory transports); those
that start real processes (``peer`` subprocesses, p2p daemons, hivemind DHT nodes) are marked
``network``: ``pytest -m "not network"`` runs everything else (about half a minute on 2 cores),
and ``pytest -m network`` only them.

Test modules share helpers through ``tests.helpers`` (real processes, daemons, small data),
``tests.sim_swarm`` (protocols on the simulator) and ``tests.vector_learner``, never through one another.
"""

import logging
import signal
import warnings

import pytest


@pytest.fixture(autouse=True)
def root_logger_restored():
    """``peer.cli.main`` configures the root logger; the next test gets it back as it was."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.fixture(autouse=True)
def ctrl_c_handler_restored(request):
    """Each test ends with Python's own Ctrl-C handler back: code that starts hivemind's processes
    ignores SIGINT while it does, and a test that left it ignored would hand that on to every peer
    process that later tests start (which would then ignore Ctrl-C). Such a test is named."""
    yield
    handler = signal.getsignal(signal.SIGINT)
    if handler is not signal.default_int_handler:
        warnings.warn(f"{request.node.nodeid} (or a fixture's teardown before it) left SIGINT's handler at {handler!r}; restored", stacklevel=1)
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def _dataset_cache(tmp_path_factory):
    """Keep generated datasets out of the user's home; one cache for the whole session."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PEER_CACHE_DIR", str(tmp_path_factory.mktemp("peer-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def dhts(tmp_path_factory):
    """Four hivemind DHT nodes on loopback, for the module that asks (a ``network`` test): (node, signer)
    for alice, bob, mallory and trudy. Honest nodes sign their records with their identities; mallory
    runs hivemind as it comes, without the validator that honest peers use; trudy signs her own
    records properly but is not a member. See ``tests.helpers.membership``."""
    import hivemind
    from hivemind.dht.crypto import RSASignatureValidator

    from peer.net.access import load_identity

    folder = tmp_path_factory.mktemp("identities")
    nodes = []
    try:
        for name in ("alice", "bob", "mallory", "trudy"):
            key = load_identity(folder / name)
            initial = [str(a) for a in nodes[0][0].get_visible_maddrs()] if nodes else []
            validators = [] if name == "mallory" else [RSASignatureValidator(key)]
            dht = hivemind.DHT(
                initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(folder / name),
                record_validators=validators, start=True, startup_timeout=60,
            )
            nodes.append((dht, RSASignatureValidator(key)))
        yield nodes
    finally:
        for dht, _ in nodes:
            dht.shutdown()
