import pytest


@pytest.fixture(autouse=True, scope="session")
def _dataset_cache(tmp_path_factory):
    """Keep generated datasets out of the user's home; one cache for the whole session."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PEER_CACHE_DIR", str(tmp_path_factory.mktemp("peer-cache")))
    yield
    patch.undo()


# Tests that start swarms of real peer processes run one after another on one worker: two side by
# side would crowd a 2-core machine and stretch their timeouts. Everything else runs beside them.
REAL_PEER_MODULES = {
    "test_access", "test_async_network", "test_drift", "test_modest_network", "test_network", "test_reaper",
    "test_srrw_network", "test_strangers",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in REAL_PEER_MODULES:
            item.add_marker(pytest.mark.xdist_group("real-peers"))
