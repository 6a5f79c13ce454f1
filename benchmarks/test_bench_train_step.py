"""Whole training step (forward + backward + AdamW): mae_fast (backend="auto") vs its reference
path vs HF ViTMAEForPreTraining vs the official models_mae.py (``--official-mae``), same sizes.

pytest-benchmark times each contender in turn; for a ratio on a shared or drifting machine use
``benchmarks/interleaved.py``, which alternates the contenders round by round.
"""
import pytest
import torch

import mae_contenders as mc

_BUILT = {}


def _contenders(config, device, dtype):
    key = (config.getoption("--bench-size"), config.getoption("--bench-batch"), device.type,
           config.getoption("--official-mae"), dtype)
    if key not in _BUILT:
        _BUILT.clear()  # one set of models alive at a time
        _BUILT[key] = mc.build_all(key[0], key[1], device, dtype, key[3])
    return _BUILT[key]


@pytest.mark.parametrize("name", mc.CONTENDERS)
def test_train_step(benchmark, request, name, device, dtype):
    size = request.config.getoption("--bench-size")
    batch = request.config.getoption("--bench-batch")
    rounds = request.config.getoption("--bench-rounds")
    contender = _contenders(request.config, device, dtype).get(name)
    if contender is None:
        pytest.skip(f"{name} was not built")
    if isinstance(contender, mc.Unavailable):
        pytest.skip(contender.reason)
    benchmark.group = (f"train step, {size}, batch {batch}, {str(dtype).replace('torch.', '')}, {device.type}, "
                       f"{torch.get_num_threads()} threads")
    benchmark.name = f"train step {name}"
    benchmark.extra_info["what runs"] = contender.note
    contender.prepare()
    benchmark.pedantic(contender.step, rounds=rounds, warmup_rounds=1, iterations=1)
