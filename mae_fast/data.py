"""Images for pretraining, with PIL and torch only (no torchvision).

* ``ImageFolder``: an ImageNet-style tree ``root/<class>/<image>`` (or ``root/train/<class>/...``).
* ``BuiltinImages``: real photos shipped inside the scikit-image wheel (``skimage.data``: astronaut,
  coffee, chelsea, rocket, ...) and its 200 LFW faces; no download.
* ``TrainTransform``: the official pretraining augmentation, RandomResizedCrop(scale=(0.2, 1.0),
  bicubic) + horizontal flip + ToTensor + ImageNet normalisation, re-implemented on PIL.

Randomness is *stateless*: a sample is asked for as ``(index, sample_seed)`` and its crop and flip
come from ``numpy.random.default_rng(sample_seed)``. The pipeline therefore gives the same pixels
whatever the number of workers, and a resumed run sees exactly the images an uninterrupted run
would have seen (see ``mae_fast.pretrain``). A plain ``int`` index gives the deterministic
evaluation view (resize + center crop).

Unreadable files (corrupt, truncated, empty, not an image): ``dataset[key]`` raises
``UnreadableImage`` naming the file; ``dataset.load(key)`` (what the trainer's loader calls) puts a
substitute sample in its place instead, chosen from the key alone (index, sample_seed), so batches
stay full and a function of their keys (exact resume, any number of workers), and returns the
``(path, reason)`` of every file it passed over so the caller can warn, count or stop.
"""
import math
import os
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Key = Union[int, Tuple[int, int]]  # index (eval view) or (index, sample_seed) (train view)


class DataError(ValueError):
    """A data path or data set that cannot be used (missing, empty, unreadable)."""


class UnreadableImage(DataError):
    """One image file that cannot be decoded (corrupt, truncated, empty, not an image)."""


# ``load`` gives up after this many unreadable images in a row for one sample
MAX_SUBSTITUTES = 16
BadFile = Tuple[str, str]  # (path, reason)


# ---------------------------------------------------------------------------------------------
# transforms
def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.2, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """torchvision's RandomResizedCrop.get_params, driven by ``rng``: (left, top, w, h)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # fallback: central crop of the whole image at the nearest allowed ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_normalized_tensor(img, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """PIL RGB (H, W), or a uint8 tensor (3, H, W) -> float32 (3, H, W): ToTensor (/255) then
    Normalize(mean, std)."""
    if isinstance(img, torch.Tensor):
        x = img.to(torch.float32) / 255.0  # (3, H, W)
    else:
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0  # (3, H, W)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean_t) / std_t


def denormalize(x: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """(N, 3, H, W) normalised -> pixel values in [0, 1] (clamped)."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * std_t + mean_t).clamp(0, 1)


def jpeg_draft(img: Image.Image, box, size: int):
    """(image, box): a JPEG not yet decoded, set to decode at the smallest DCT scale (1/2, 1/4, 1/8)
    that keeps the crop ``box`` (in full-size pixels) at least ``size`` pixels on each side, and the
    box in the pixels of that scale. Other formats (and crops too small to shrink) are unchanged."""
    left, top, right, bottom = box
    if img.format != "JPEG" or min(right - left, bottom - top) < 2 * size:
        return img, box
    full_w, full_h = img.size
    # draft picks the largest reduction whose whole image is >= the requested size
    want = (math.ceil(full_w * size / (right - left)), math.ceil(full_h * size / (bottom - top)))
    img.draft("RGB", want)
    sx, sy = img.size[0] / full_w, img.size[1] / full_h
    return img, (left * sx, top * sy, right * sx, bottom * sy)


class TrainTransform:
    """RandomResizedCrop(size, scale, bicubic) + RandomHorizontalFlip(0.5) + normalise.

    ``draft``: an image given still undecoded (``Image.open``) is decoded by ``jpeg_draft`` at a
    reduced DCT scale when the crop is at least twice the output; the crop and flip draws are the
    same, the pixels differ slightly (docs/DATA.md)."""

    def __init__(self, size: int, scale=(0.2, 1.0), draft: bool = False):
        self.size = int(size)
        self.scale = tuple(scale)
        self.draft = draft

    def draw(self, width: int, height: int, sample_seed: int):
        """(left, top, w, h) crop box and flip, from the sample seed and the image size only."""
        rng = np.random.default_rng(sample_seed)
        box = random_resized_crop_box(width, height, rng, self.scale)
        return box, bool(rng.random() < 0.5)

    def __call__(self, img: Image.Image, sample_seed: int) -> torch.Tensor:
        (left, top, w, h), flip = self.draw(img.width, img.height, sample_seed)
        box = (left, top, left + w, top + h)
        if self.draft:
            img, box = jpeg_draft(img, box, self.size)
        if img.mode != "RGB":
            img = img.convert("RGB")
        out = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(out)

    def on_tensor(self, img: torch.Tensor, sample_seed: int) -> torch.Tensor:
        """The same draws on a decoded uint8 (3, H, W) tensor, cropped and resized by torchvision
        (bicubic, antialiased): ``--decode torchvision``."""
        from torchvision.transforms.v2 import InterpolationMode, functional as TF
        (left, top, w, h), flip = self.draw(img.shape[-1], img.shape[-2], sample_seed)
        out = TF.resized_crop(img, top, left, h, w, [self.size, self.size],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)  # (3, size, size) uint8
        if flip:
            out = out.flip(-1)
        return to_normalized_tensor(out)


class EvalTransform:
    """Resize the short side to ``size`` (bicubic) and center-crop ``size`` x ``size``."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        s = min(img.width, img.height)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        out = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + s, top + s))
        return to_normalized_tensor(out)


# ---------------------------------------------------------------------------------------------
# data sets
class _Images(torch.utils.data.Dataset):
    """Common ``__getitem__``: ``(index, sample_seed)`` -> augmented view, ``index`` -> eval view."""

    def __init__(self, size: int, scale=(0.2, 1.0), draft: bool = False):
        self.train_transform = TrainTransform(size, scale, draft)
        self.eval_transform = EvalTransform(size)

    def image(self, index: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def label(self, index: int) -> int:
        return 0

    def __getitem__(self, key: Key) -> torch.Tensor:
        """The sample of ``key``; an unreadable image raises ``UnreadableImage``."""
        if isinstance(key, (tuple, list)):
            index, sample_seed = key
            return self.train_view(int(index), int(sample_seed))
        return self.eval_transform(self.image(int(key)))

    def train_view(self, index: int, sample_seed: int) -> torch.Tensor:
        return self.train_transform(self.image(index), sample_seed)

    def load(self, key: Key) -> Tuple[torch.Tensor, Tuple[BadFile, ...]]:
        """(sample, bad files): the sample of ``key``, or, when its image is unreadable, of a
        substitute ``(index, sample_seed)`` drawn from ``key`` alone (attempt after attempt while
        the substitutes are unreadable too), with the ``(path, reason)`` of each file passed over."""
        bad = []
        cur = key
        for attempt in range(MAX_SUBSTITUTES + 1):
            try:
                return self[cur], tuple(bad)
            except UnreadableImage as e:
                bad.append((e.path, e.reason))
                cur = self.substitute(key, attempt)
        raise DataError(f"{len(bad)} unreadable images in a row while loading sample {key} "
                        f"(first: {bad[0][0]!r}: {bad[0][1]}); is most of the data set unreadable?")

    def substitute(self, key: Key, attempt: int) -> Key:
        """The key that stands in for ``key`` at its ``attempt``-th unreadable image: a function of
        ``(index, sample_seed, attempt)`` only (the sample seed carries the run seed and the epoch)."""
        if isinstance(key, (tuple, list)):
            rng = np.random.default_rng([int(key[0]), int(key[1]), attempt])
            return int(rng.integers(len(self))), int(rng.integers(2 ** 62))
        rng = np.random.default_rng([int(key), attempt])
        return int(rng.integers(len(self)))

    def preview_indices(self, n: int) -> List[int]:
        """``n`` indices spread over the data set, for the reconstruction pictures."""
        n = min(n, len(self))
        return [int(i) for i in np.linspace(0, len(self) - 1, n).round()] if n > 1 else [0]


def _unreadable(path: str, e: Exception) -> UnreadableImage:
    reason = f"{type(e).__name__}: {e}"
    err = UnreadableImage(f"cannot read image {path!r}: {reason}")
    err.path, err.reason = path, reason
    return err


def _open_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class ImageFolder(_Images):
    """``root/<class>/<image>`` (ImageNet layout). ``root/train`` is used when it exists.

    Classes are the sorted sub-folders (labels 0..K-1); image files are found recursively inside
    each class folder. Images directly under ``root`` (no class folders) form a single class.
    ``decode``: "pil" (decode the whole image), "pil-draft" (JPEGs decoded at a reduced DCT scale
    when the random crop is at least twice the output side; see ``jpeg_draft``) or "torchvision"
    (``torchvision.io.decode_image`` + ``resized_crop``, when torchvision is installed; training
    views only, the evaluation view stays PIL). All three make the same crop and flip draws.
    """
    DECODE_MODES = ("pil", "pil-draft", "torchvision")

    def __init__(self, root: str, size: int, scale=(0.2, 1.0), decode: str = "pil"):
        if decode not in self.DECODE_MODES:
            raise DataError(f"decode mode {decode!r}: one of {', '.join(self.DECODE_MODES)}")
        if decode == "torchvision":
            try:
                import torchvision.io  # noqa: F401
                from torchvision.transforms.v2 import functional  # noqa: F401
            except Exception as e:
                raise DataError(f"--decode torchvision needs torchvision (pip install torchvision, matching "
                                f"your torch): {type(e).__name__}: {e}") from e
        super().__init__(size, scale, draft=decode == "pil-draft")
        self.decode = decode
        root = os.path.expanduser(os.fspath(root))
        if not os.path.exists(root):
            raise DataError(f"--data-path {root!r} does not exist")
        if not os.path.isdir(root):
            raise DataError(f"--data-path {root!r} is not a directory")
        if os.path.isdir(os.path.join(root, "train")):
            root = os.path.join(root, "train")
        self.root = root
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        samples = []
        for label, cls in enumerate(classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
                dirnames.sort()
                samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames)
                            if f.lower().endswith(IMG_EXTENSIONS)]
        if not classes:  # a flat folder of images
            samples = [(os.path.join(root, f), 0) for f in sorted(os.listdir(root))
                       if f.lower().endswith(IMG_EXTENSIONS)]
            classes = ["."]
        if not samples:
            raise DataError(f"--data-path {root!r} holds no images ({', '.join(IMG_EXTENSIONS)}) "
                            f"in class sub-folders root/<class>/<image>")
        self.classes = classes
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            return _open_rgb(path)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise _unreadable(path, e) from e

    def train_view(self, index: int, sample_seed: int) -> torch.Tensor:
        path = self.samples[index][0]
        if self.decode == "torchvision":
            from torchvision.io import ImageReadMode, decode_image, read_file
            try:
                img = decode_image(read_file(path), mode=ImageReadMode.RGB)  # (3, H, W) uint8
            except Exception as e:
                raise _unreadable(path, e) from e
            return self.train_transform.on_tensor(img, sample_seed)
        if not self.train_transform.draft:
            return super().train_view(index, sample_seed)
        try:  # decoded inside the transform, after the crop is known
            with open(path, "rb") as f:
                return self.train_transform(Image.open(f), sample_seed)
        except Exception as e:
            raise _unreadable(path, e) from e

    def label(self, index: int) -> int:
        return self.samples[index][1]


# scikit-image sample photos (files inside the skimage wheel; none is downloaded)
BUILTIN_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                  "retina", "camera", "coins", "moon", "brick", "grass", "gravel", "clock", "horse")


def _builtin_sources():
    try:
        import skimage.data as skdata
    except ImportError as e:
        raise DataError("the built-in data set needs scikit-image (pip install scikit-image), "
                        "or pass --data-path to an ImageFolder tree") from e
    photos, names = [], []
    for name in BUILTIN_PHOTOS:
        try:
            arr = np.asarray(getattr(skdata, name)())
        except Exception:  # a sample missing from this scikit-image version
            continue
        photos.append(_array_to_rgb(arr))
        names.append(name)
    try:
        left, right, _ = skdata.stereo_motorcycle()
        photos += [_array_to_rgb(left), _array_to_rgb(right)]
        names += ["motorcycle_left", "motorcycle_right"]
    except Exception:
        pass
    try:
        faces = [_array_to_rgb(f) for f in np.asarray(skdata.lfw_subset())]  # 200 x (25, 25) in [0, 1]
    except Exception:
        faces = []
    if not photos and not faces:
        raise DataError("scikit-image ships no sample images here; pass --data-path")
    return photos, names, faces


def _array_to_rgb(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8) \
            if arr.max() <= 1.0 else np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]))


class BuiltinImages(_Images):
    """``length`` samples from the scikit-image sample photos and LFW faces; no download.

    Even indices cycle through the photos, odd ones through the faces (so the 200 small faces
    do not drown the ~17 large photos); every training sample is a fresh random crop.
    """

    def __init__(self, size: int, length: int = 4096, scale=(0.2, 1.0)):
        super().__init__(size, scale)
        if length < 1:
            raise DataError(f"the built-in data set needs a positive length, got {length}")
        self.photos, self.photo_names, self.faces = _builtin_sources()
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def image(self, index: int) -> Image.Image:
        if not self.faces:
            return self.photos[index % len(self.photos)]
        if not self.photos:
            return self.faces[index % len(self.faces)]
        pool = self.photos if index % 2 == 0 else self.faces
        return pool[(index // 2) % len(pool)]

    def preview_indices(self, n: int) -> List[int]:
        """Distinct photos first (even indices), then faces."""
        photos = [2 * i for i in range(min(len(self.photos), self.length // 2 or 1))]
        faces = [2 * i + 1 for i in range(min(len(self.faces), self.length // 2))]
        picks = (photos[: (n + 1) // 2] + faces[: n // 2])
        picks += [i for i in photos + faces if i not in picks]
        return [i for i in picks if i < self.length][:n]


def stack(batch: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(batch), 0)
