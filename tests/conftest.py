import os

# Triton decides at decoration time whether a kernel is interpreted: set this before anything
# imports triton, so every Triton kernel can run on CPU tensors in the tests. backend="auto"
# never picks the interpreter on CPU (see mae_fast.backends); tests ask for backend="fast".
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
