import pytest


@pytest.fixture(autouse=True, scope="session")
def _dataset_cache(tmp_path_factory):
    """Keep generated datasets out of the user's home; one cache for the whole session."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PEER_CACHE_DIR", str(tmp_path_factory.mktemp("peer-cache")))
    yield
    patch.undo()
