import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path_factory, monkeypatch):
    """Each test its own XDG_CACHE_HOME (inherited by the processes it starts): plan="auto" caches measured
    profiles there by default, and a test must neither write to the home folder nor see another test's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache-home")))


def pytest_configure(config):
    """No test, and no process a test starts, writes a profile cache to the home folder (a module-scoped
    fixture runs before the per-test folder above is set)."""
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="horizon-test-cache-")
