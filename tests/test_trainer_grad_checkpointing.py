"""--grad-checkpointing: the blocks are recomputed in backward; same loss and gradients, fewer
activation bytes kept (measured on CPU with saved_tensors_hooks)."""
import pytest
import torch

from mae_fast import pretrain
from mae_fast.train.memory import saved_activation_bytes

from test_pretrain import read_log, run_pretrain


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_same_loss_and_gradients(backend):
    torch.manual_seed(0)
    model = pretrain.mae_vit_tiny_patch4(img_size=20, backend=backend)  # 5 x 5 patches: odd shapes
    imgs, noise = torch.randn(3, 3, 20, 20), torch.rand(3, 25)
    grads = []
    for on in (False, True):
        model.set_grad_checkpointing(on)
        model.zero_grad()
        loss, pred, _ = model(imgs, mask_ratio=0.6, noise=noise)
        loss.backward()
        grads.append((loss.detach(), pred.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                     if p.grad is not None}))
    (l0, p0, g0), (l1, p1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(p1, p0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def test_fewer_activation_bytes():
    torch.manual_seed(0)
    model = pretrain.mae_vit_tiny_patch4(img_size=32)
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    off = saved_activation_bytes(model, imgs, noise=noise)
    model.set_grad_checkpointing(True)
    on = saved_activation_bytes(model, imgs, noise=noise)
    assert 0 < on < off / 2


def test_cli_flag_trains_the_same(tmp_path):
    assert run_pretrain(tmp_path / "off", "--epochs", 1) == 0
    assert run_pretrain(tmp_path / "on", "--epochs", 1, "--grad-checkpointing") == 0
    steps_off, losses_off = read_log(tmp_path / "off")
    steps_on, losses_on = read_log(tmp_path / "on")
    assert steps_on == steps_off
    torch.testing.assert_close(losses_on, losses_off, rtol=1e-5, atol=1e-6)
