"""The rack fixture: one simulated rack per test module (tests/rack/rack.py), torn down by pid and
by name whatever happens; skipped, with the reason, where network namespaces cannot be made."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from .rack import Rack, unavailable


@pytest.fixture(scope="module")
def rack():
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    # Not under pytest's own tmp directory: that one is closed to other users (0700), and the
    # workers run their tasks as another user, who must pass through the hosts' trees as on a
    # real host's /var/lib. The rack's directory is made 0711 (its logs go with it; a failure's
    # message carries every host's log tail).
    directory = Path(tempfile.mkdtemp(prefix="crk-rack-"))
    directory.chmod(0o711)
    r = Rack(directory)
    try:
        r.up()
        yield r
    finally:
        problems = r.down()
        shutil.rmtree(directory, ignore_errors=True)
        assert problems == [], problems


@pytest.fixture
def healthy(rack):
    """The rack, healed and serving as a whole before the test (a failed test leaves no cut)."""
    rack.heal()
    rack.wait_healthy(30)
    return rack
