"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest

from tests.kernels.backends import RUNNERS, running


@pytest.fixture(scope="module", params=RUNNERS)
def runner(request):
    """Each backend that runs here in turn (``tests.kernels.backends``); module-scoped, so
    the tests of one backend run together inside its set-up (e.g. the emulation)."""
    with running(request.param) as r:
        yield r
