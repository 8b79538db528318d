"""Shared fixtures: one seeded random source for every test."""
import numpy as np
import pytest
import torch

from sparseprune import _native

# A build without OpenMP warns (once per process, RuntimeWarning) the first time more than one
# thread is asked for, explicitly or through torch's thread count. Which test asks first depends
# on the order tests run in, so on such a build every test expects that warning;
# tests/test_openmp_warning.py checks the warning itself, on both kinds of build.
NO_OPENMP_WARNING = "sparseprune was built without OpenMP: kernels run on one thread"


def pytest_collection_modifyitems(config, items):
    if not _native.openmp_enabled():
        # (the filter's fields are ':'-separated, so it matches the message's start)
        expect = pytest.mark.filterwarnings("ignore:sparseprune was built without OpenMP:RuntimeWarning")
        for item in items:
            item.add_marker(expect)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(12345)
    yield


@pytest.fixture(params=("baseline", "avx2", "avx2_w16", "avx512"))
def simd_path(request):
    """Runs the test once per SIMD path of the native kernels (forced with set_isa, automatic
    choice restored after). A path this CPU or build cannot run is skipped with the reason, e.g.
    "avx512: CPU (or OS) lacks AVX-512 ...", so the run says which paths it did not test."""
    from sparseprune import _native

    assert request.param in _native.SIMD_PATHS
    reason = _native.simd_paths()[request.param]
    if reason is not None:
        pytest.skip(reason)
    _native.set_isa(request.param)
    yield request.param
    _native.set_isa("auto")


@pytest.fixture
def one_torch_thread():
    """For tests of the math on tiny tensors: extra threads only add contention on a shared
    machine (threaded kernels are compared with one thread in the kernel tests)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def served_models(tmp_path_factory):
    """The serve tests' executables (tests/serving.py), compiled once per session: name -> path."""
    from serving import compile_models

    return compile_models(tmp_path_factory.mktemp("served"))
