"""The "built without OpenMP" warning: given on a build without OpenMP when more than one thread
is asked for (once per process), never on a build with OpenMP. The suite runs on both kinds of
build (.ci/run has a no-OpenMP job), so each branch below is exercised somewhere."""
import warnings

import pytest
from conftest import NO_OPENMP_WARNING  # tests/conftest.py

from sparseprune import _native, config


@pytest.fixture
def fresh_warning_state(monkeypatch):
    """As if no thread count had been asked for yet in this process."""
    monkeypatch.setattr(config, "_warned_no_openmp", False)


def test_one_thread_never_warns(fresh_warning_state):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.resolve_threads(1) == 1


def _warnings_of(call):
    """The warnings `call()` gives (recorded whatever the filters say), and its result."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return caught, result


def test_more_threads_warn_once_without_openmp_only(fresh_warning_state):
    first, n = _warnings_of(lambda: config.resolve_threads(2))
    assert n == 2
    again, n = _warnings_of(lambda: config.resolve_threads(4))
    assert n == 4
    ours = [w for w in first + again if str(w.message) == NO_OPENMP_WARNING]
    if _native.openmp_enabled():
        assert first == [] and again == []
    else:
        assert len(ours) == 1 and ours[0].category is RuntimeWarning
        assert list(again) == []
        assert _native.max_threads() == 1
