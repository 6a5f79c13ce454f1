"""facebookresearch/mae's training-checkpoint code, re-created from the official logic (not
vendored): ``util/misc.py`` ``save_model`` / ``load_model``, timm's ``add_weight_decay`` as
``main_pretrain.py`` calls it, and ``main_pretrain.py``'s args. Shared by the checkpoint and the
trainer-resume tests."""
import argparse
import os

import torch

import mae_fast

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=4,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0)


def official_add_weight_decay(model, weight_decay=1e-5, skip_list=()):
    """timm 0.3.2 optim_factory.add_weight_decay, as main_pretrain.py calls it (skip_list=())."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def official_optimizer(model, wd=0.05, lr=1e-3):
    return torch.optim.AdamW(official_add_weight_decay(model, wd), lr=lr, betas=(0.9, 0.95))


def official_args(**kw):
    """main_pretrain.py's argparse.Namespace (its default values), as saved in checkpoint-N.pth."""
    a = dict(batch_size=64, epochs=400, accum_iter=1, model="mae_vit_large_patch16", input_size=224,
             mask_ratio=0.75, norm_pix_loss=False, weight_decay=0.05, lr=None, blr=1e-3, min_lr=0.0,
             warmup_epochs=40, data_path="/datasets01/imagenet_full_size/061417/", output_dir="./output_dir",
             log_dir="./output_dir", device="cuda", seed=0, resume="", start_epoch=0, num_workers=10,
             pin_mem=True, world_size=1, local_rank=-1, dist_on_itp=False, dist_url="env://",
             distributed=False)
    a.update(kw)
    return argparse.Namespace(**a)


def official_save_model(args, epoch, model_without_ddp, optimizer, loss_scaler):
    """util/misc.py save_model (the loss_scaler branch): torch.save of a dict."""
    to_save = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
               "scaler": loss_scaler.state_dict(), "args": args}
    path = os.path.join(args.output_dir, "checkpoint-%s.pth" % epoch)
    torch.save(to_save, path)
    return path


def official_load_model(args, model_without_ddp, optimizer, loss_scaler):
    """util/misc.py load_model, on current torch (where torch.load defaults to weights_only)."""
    checkpoint = torch.load(args.resume, map_location="cpu")
    model_without_ddp.load_state_dict(checkpoint["model"])
    if "optimizer" in checkpoint and "epoch" in checkpoint and not (hasattr(args, "eval") and args.eval):
        optimizer.load_state_dict(checkpoint["optimizer"])
        args.start_epoch = checkpoint["epoch"] + 1
        if "scaler" in checkpoint:
            loss_scaler.load_state_dict(checkpoint["scaler"])


def train_steps(model, optimizer, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        imgs = torch.randn(2, 3, 16, 16, generator=g)
        noise = torch.rand(2, 16, generator=g)
        loss, _, _ = model(imgs, mask_ratio=0.75, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.detach()


def official_run(tmp_path, epoch=3, mae=None, **args):
    """A tiny official run: a few AdamW steps, then misc.save_model's checkpoint-<epoch>.pth
    (``mae``: the model, default a TINY MaskedAutoencoderViT; ``args``: main_pretrain.py values to change)."""
    model = mae if mae is not None else mae_fast.MaskedAutoencoderViT(**TINY, backend="reference")
    optimizer = official_optimizer(model)
    train_steps(model, optimizer, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    args = official_args(**{"output_dir": str(tmp_path), **args})
    return official_save_model(args, epoch, model, optimizer, scaler), model, optimizer
