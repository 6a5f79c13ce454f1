"""Activation memory of one training step, measured on the device the model is on (CPU works):
the bytes of the distinct tensor storages autograd saves for the backward pass."""
import torch


def saved_activation_bytes(model, imgs: torch.Tensor, mask_ratio: float = 0.75, noise=None, amp_dtype=None) -> int:
    """Forward ``model(imgs)`` with grad and return the bytes autograd keeps for backward
    (parameters excluded; each storage counted once). With ``model.set_grad_checkpointing(True)``
    only the blocks' inputs are kept."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and t.device.type != "meta":
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(imgs.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, _, _ = model(imgs, mask_ratio=mask_ratio, noise=noise)
    del loss
    return sum(storages.values())


if __name__ == "__main__":
    import argparse

    from ..recipes import build_model
    p = argparse.ArgumentParser(description="activation bytes saved for backward, with and without "
                                            "--grad-checkpointing (CPU-measured)")
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    a = p.parse_args()
    torch.manual_seed(0)
    model = build_model(a.model, a.input_size)
    imgs = torch.randn(a.batch_size, 3, a.input_size, a.input_size)
    noise = torch.rand(a.batch_size, model.patch_embed.num_patches)
    for on in (False, True):
        model.set_grad_checkpointing(on)
        print(f"{a.model} {a.input_size}px batch {a.batch_size}, grad checkpointing {'on ' if on else 'off'}: "
              f"{saved_activation_bytes(model, imgs, noise=noise) / 2**20:.1f} MiB saved for backward", flush=True)
