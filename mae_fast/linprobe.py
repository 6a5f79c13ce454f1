"""``mae-fast linprobe``: what pretraining bought, in one number next to a baseline.

Encoder features (``model.forward_encoder(imgs, mask_ratio=0)``, the mean of the patch tokens, or
the cls token with ``--pool cls``) -> standardised -> scikit-learn ``LogisticRegression`` trained on
75% of the images and scored on the held-out 25% (stratified split, fixed seed). The same probe
runs on a randomly initialised encoder of the same config and seed (the weights pretraining
started from), and both accuracies are printed.

Data: scikit-learn's digits (1797 images, 8 x 8, 16 grey levels, 10 classes), scaled to [0, 1],
resized bilinearly to the model's input size, the grey value copied to the 3 channels and
normalised with the ImageNet mean/std like the pretraining images; or ``--data-path`` to an
ImageFolder tree whose sub-folders are the classes (resize + center crop).
The standardisation plays the part of the official linear probe's affine-free BatchNorm.
"""
import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from .data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, DataError, ImageFolder, stack
from .recipes import UsageError, build_model, default_cpu_threads
from .train.amp import AMP_NAMES, resolve_amp


def digits_images(input_size: int):
    """scikit-learn digits -> imgs (1797, 3, S, S) normalised, labels (1797,)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.expand(-1, 3, -1, -1)  # (N, 3, S, S)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(), digits.target.astype(np.int64)


def folder_images(path: str, input_size: int):
    dataset = ImageFolder(path, input_size)
    if len(dataset.classes) < 2:
        raise DataError(f"--data-path {path!r}: a linear probe needs at least 2 class sub-folders")
    imgs = stack([dataset[i] for i in range(len(dataset))])
    return imgs, np.array([dataset.label(i) for i in range(len(dataset))], dtype=np.int64)


@torch.no_grad()
def encoder_features(model, imgs: torch.Tensor, pool: str = "mean", batch_size: int = 256, device=None,
                     amp_dtype=None):
    """imgs (N, 3, S, S) -> features (N, D) as a float64 numpy array (encoder under autocast
    ``amp_dtype`` when given)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats = []
    try:
        for start in range(0, imgs.shape[0], batch_size):
            x = imgs[start:start + batch_size].to(device)
            # mask_ratio 0 keeps every patch; increasing noise keeps them in image order, so the
            # features do not depend on the global RNG (token order changes float sums)
            num_patches = model.patch_embed.num_patches
            noise = torch.arange(num_patches, device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
            with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                latent, _, _ = model.forward_encoder(x, mask_ratio=0.0, noise=noise)  # (B, 1 + L, D)
            f = latent[:, 0] if pool == "cls" else latent[:, 1:].mean(dim=1)
            feats.append(f.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats).double().numpy()


def probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0, test_size: float = 0.25) -> float:
    """Held-out accuracy of a logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=test_size,
                                                        random_state=seed, stratify=labels)
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000)
    with _one_blas_thread():  # a small problem: BLAS threads only fight (100x slower on a busy CPU)
        clf.fit(scaler.transform(x_train), y_train)
        return float(clf.score(scaler.transform(x_test), y_test))


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(1)


def compare_with_random_init(model, model_name: str, input_size: int, seed: int, device, *,
                             norm_pix_loss=False, backend="auto", pool="mean", data_path=None, out=print,
                             amp_dtype=None):
    """Probe ``model`` and a fresh ``model_name`` built after ``torch.manual_seed(seed)`` (features
    under autocast ``amp_dtype`` when given)."""
    imgs, labels = digits_images(input_size) if data_path is None else folder_images(data_path, input_size)
    data = "digits" if data_path is None else data_path
    cpu_state = torch.get_rng_state()
    torch.manual_seed(seed)
    random_model = build_model(model_name, input_size, norm_pix_loss, backend).to(device)
    torch.set_rng_state(cpu_state)
    acc_trained = probe_accuracy(encoder_features(model, imgs, pool, device=device, amp_dtype=amp_dtype), labels, seed)
    acc_random = probe_accuracy(encoder_features(random_model, imgs, pool, device=device, amp_dtype=amp_dtype),
                                labels, seed)
    amp = "" if amp_dtype is None else f", {AMP_NAMES[amp_dtype]} autocast"
    out(f"linear probe on {data} ({len(labels)} images, {len(np.unique(labels))} classes, 25% held out, "
        f"{pool}-pooled encoder features{amp} -> logistic regression):")
    out(f"  pretrained encoder:  {100 * acc_trained:.1f}% accuracy")
    out(f"  random-init encoder: {100 * acc_random:.1f}% accuracy  (same config, seed {seed})")
    return {"pretrained": acc_trained, "random_init": acc_random}


def build_parser():
    p = argparse.ArgumentParser(prog="mae-fast linprobe",
                                description="Linear probe of a pretrained MAE encoder vs its random init.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint of mae-fast pretrain, an official MAE one (weights or a main_pretrain.py "
                        "checkpoint-N.pth), or a .safetensors file")
    p.add_argument("--model", default=None, help="model name (default: from the checkpoint's args)")
    p.add_argument("--input-size", type=int, default=None, help="default: from the checkpoint's args")
    p.add_argument("--data-path", default=None, help="ImageFolder with class sub-folders (default: digits)")
    p.add_argument("--pool", default="mean", choices=("mean", "cls"))
    p.add_argument("--seed", type=int, default=None, help="split and random-init seed (default: checkpoint's)")
    p.add_argument("--device", default=None)
    p.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"),
                   help="autocast of the encoder's features (auto: as mae-fast pretrain chooses)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the tiny models on CPU, else torch's choice)")
    return p


def main(argv=None) -> int:
    from .checkpoint import checkpoint_args, load_official_checkpoint, read_checkpoint, read_state_dict
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        # weights-only: a mae-fast checkpoint, an official one (its args an argparse.Namespace)
        # or a .safetensors file (args from its metadata)
        try:
            ckpt = read_checkpoint(args.checkpoint)
        except FileNotFoundError as e:
            raise UsageError(f"--checkpoint {args.checkpoint!r} does not exist") from e
        except ImportError as e:
            raise UsageError(str(e)) from e
        saved = checkpoint_args(ckpt)
        model_name = args.model or saved.get("model")
        input_size = args.input_size or saved.get("input_size")
        if model_name is None or input_size is None:
            raise UsageError("the checkpoint has no 'args': pass --model and --input-size")
        seed = args.seed if args.seed is not None else int(saved.get("seed", 0))
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        threads = args.num_threads
        if threads is None and device.type == "cpu":
            threads = default_cpu_threads(model_name)
        if threads is not None:
            torch.set_num_threads(threads)
        model = build_model(model_name, int(input_size), bool(saved.get("norm_pix_loss", False)))
        load_official_checkpoint(model, read_state_dict(ckpt), strict_decoder=False)
        amp_dtype, amp_reason = resolve_amp(args.amp, device, width=model.cls_token.shape[-1])
        print(f"amp {AMP_NAMES[amp_dtype]} ({amp_reason})")
        compare_with_random_init(model.to(device), model_name, int(input_size), seed, device,
                                 norm_pix_loss=bool(saved.get("norm_pix_loss", False)), pool=args.pool,
                                 data_path=args.data_path, amp_dtype=amp_dtype)
        return 0
    except (ValueError, TypeError) as e:  # UsageError, DataError, a checkpoint that does not fit the model
        print(f"mae-fast linprobe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
