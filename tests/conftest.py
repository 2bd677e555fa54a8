"""Fixtures for the qcow2fast test suite.

qemu-img / qemu-io 7.2 (Debian qemu-utils) are the oracle.  When they are
missing the interop tests are skipped -- except under ``CI=true``, where a
missing oracle fails the session before any test runs.

The tests are grouped by area, one package each: ``unit/`` (one subsystem
at a time: header, geometry, refcount growth, cache, host files, kernels),
``api/`` (the Image API), ``interop/`` (qemu reads what qcow2fast writes and
the reverse, crash safety), ``cli/``, ``nbd/``, ``convert/`` and ``bench/``.
The helper functions live in the ``tests.helpers`` package (imported as
``from tests.helpers.qemu_util import ...``: ``tests`` is a package, so
pytest puts the repository root on sys.path); the fixtures here wrap them.
"""

import shutil

import pytest

from tests.helpers import qemu_util
from tests.helpers.qemu_util import HAVE_QEMU, IN_CI, QEMU_IMG, QEMU_IO


def pytest_configure(config):
    config.addinivalue_line("markers", "qemu: the test needs qemu-img/qemu-io as oracle")
    config.addinivalue_line("markers", "slow: a test that takes more than a few seconds")


def pytest_sessionstart(session):
    if IN_CI and not HAVE_QEMU:
        missing = [n for n, p in (("qemu-img", QEMU_IMG), ("qemu-io", QEMU_IO)) if not p]
        pytest.exit(f"CI=true but {', '.join(missing)} not found on PATH: the interop "
                    "tests cannot run (install Debian qemu-utils)", returncode=1)
    if IN_CI and not (shutil.which("nbdinfo") and shutil.which("nbdcopy")):
        pytest.exit("CI=true but nbdinfo/nbdcopy not found on PATH: the NBD server tests "
                    "cannot run (install Debian libnbd-bin)", returncode=1)


def pytest_report_header(config):
    if not HAVE_QEMU:
        return "qemu oracle: MISSING (interop tests will be skipped)"
    v = qemu_util.run([QEMU_IMG, "--version"]).stdout_text.splitlines()[0]
    return f"qemu oracle: {v}"


def pytest_collection_modifyitems(config, items):
    if HAVE_QEMU:
        return
    skip = pytest.mark.skip(reason="qemu-img/qemu-io not installed (qemu-utils)")
    for item in items:
        if item.get_closest_marker("qemu") is not None:
            item.add_marker(skip)


@pytest.fixture
def qemu():
    """The qemu oracle helpers (skips, or fails under CI, when qemu is missing)."""
    qemu_util.require_qemu()
    return qemu_util


@pytest.fixture
def qemu_raw():
    qemu_util.require_qemu()
    return qemu_util.qemu_raw


@pytest.fixture
def qemu_check():
    qemu_util.require_qemu()
    return qemu_util.qemu_check


@pytest.fixture
def qemu_compare():
    qemu_util.require_qemu()
    return qemu_util.qemu_compare


@pytest.fixture
def rng(request):
    """A deterministic RNG per test (seeded from the test id)."""
    return qemu_util.Rng(request.node.nodeid)
