import os

# Settles TRITON_INTERPRET before anything imports triton (Triton decides at decoration time
# whether a kernel is interpreted): the interpreter lane by default, the CUDA lane with
# MAE_FAST_TEST_DEVICE=cuda. See tests/_lane.py.
from _lane import LANE, CPU_LANE_ONLY, cuda_skip_reason, on_device

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs in the CUDA lane (MAE_FAST_TEST_DEVICE=cuda), "
                                       "compiled kernels on CUDA tensors; skips elsewhere")
    config.addinivalue_line("markers", "slow: a randomized sweep of many cases that repeats what the targeted "
                                       "tests check; runs in `make test`, deselected by `make test-compat`")


def pytest_report_header(config):
    return f"mae_fast test lane: {LANE} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})"


def pytest_collection_modifyitems(config, items):
    cuda_reason = cuda_skip_reason()
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            if cuda_reason:
                item.add_marker(pytest.mark.skip(reason=cuda_reason))
        elif LANE == "cuda":
            item.add_marker(pytest.mark.skip(reason=CPU_LANE_ONLY))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """The same test body on CPU (Triton interpreted) and on CUDA (Triton compiled). The cuda
    param makes CUDA the default device for factory calls in the body and turns TF32 off."""
    with on_device(torch.device(request.param)) as d:
        yield d


@pytest.fixture
def cuda_device():
    """For tests/test_cuda_*.py (marked ``cuda``): CUDA as the default device, TF32 off."""
    with on_device(torch.device("cuda")) as d:
        yield d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
