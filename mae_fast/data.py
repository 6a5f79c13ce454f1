"""Images for pretraining: PIL and torch, and torchvision when it is installed (optional).

* ``ImageFolder``: an ImageNet-style tree ``root/<class>/<image>`` (or ``root/train/<class>/...``).
* ``BuiltinImages``: real photos shipped inside the scikit-image wheel (``skimage.data``: astronaut,
  coffee, chelsea, rocket, ...) and its 200 LFW faces; no download.
* ``TarShards`` (``mae_fast.shards``): WebDataset-style tar shards ``shards-{000000..000099}.tar``.
* ``TrainTransform``: the official pretraining augmentation, RandomResizedCrop(scale=(0.2, 1.0),
  bicubic) + horizontal flip + ToTensor + ImageNet normalisation: the crop box and flip are drawn
  here; the crop/resize runs in torchvision (``decode="torchvision"``, the default ``"auto"`` when
  torchvision imports) or in PIL (``"pil"``, the fallback: same draws, pixels within about a grey
  level, docs/DATA.md). ``output="uint8"`` stops before the normalisation (uint8 (3, H, W)).

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
import io
import math
import os
from typing import List, NamedTuple, Sequence, Tuple, Union

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
DECODE_MODES = ("auto", "pil", "pil-draft", "torchvision", "gpu")
OUTPUTS = ("float", "uint8")


def torchvision_error():
    """None when torchvision's decoders and v2 functional transforms import here, else why not."""
    global _TV_ERROR
    if _TV_ERROR is _UNSET:
        try:
            import warnings
            with warnings.catch_warnings():  # 0.29 marks its decoders deprecated (TorchCodec): ours to say
                warnings.simplefilter("ignore", DeprecationWarning)
                import torchvision.io  # noqa: F401
                from torchvision.transforms.v2 import functional  # noqa: F401
            _TV_ERROR = None
        except Exception as e:  # not installed, or built for another torch
            _TV_ERROR = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return _TV_ERROR


_UNSET = object()
_TV_ERROR = _UNSET


def resolve_decode(decode: str, cuda: bool = False) -> Tuple[str, str]:
    """(mode, why): ``decode`` as it will run. "auto" -> "torchvision" when torchvision imports, else
    "pil"; "gpu" -> "gpu" only with torchvision and ``cuda`` (the run's device is a CUDA GPU), else
    the CPU mode "auto" picks, with the reason (printed in the run header)."""
    if decode not in DECODE_MODES:
        raise DataError(f"decode mode {decode!r}: one of {', '.join(DECODE_MODES)}")
    if decode in ("pil", "pil-draft"):
        return decode, "as asked"
    tv_error = torchvision_error()  # imports torchvision (about a second, once)
    if decode == "auto":
        return ("pil", f"auto: torchvision not importable ({tv_error})") if tv_error \
            else ("torchvision", "auto: torchvision importable")
    if decode == "torchvision" and tv_error:
        raise DataError(f"--decode torchvision needs torchvision (pip install 'mae_fast[torchvision]', or the "
                        f"torchvision matching your torch): {tv_error}")
    if decode == "gpu":
        if tv_error or not cuda:
            cpu, _ = resolve_decode("auto")
            why = f"torchvision not importable ({tv_error})" if tv_error else "the run's device is not a CUDA GPU"
            return cpu, f"--decode gpu needs torchvision and a CUDA device: {why}; decoding on the CPU ({cpu})"
        return "gpu", "torchvision.io.decode_jpeg on the GPU, batched (other formats on the CPU)"
    return decode, "as asked"


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL RGB (H, W) -> uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


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
        x = img.to(torch.float32) / 255.0  # (3, H, W), on the image's device (--decode gpu: the GPU)
    else:
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0  # (3, H, W)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
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

    The crop box and flip come from ``draw`` (the sample seed and the image size only); the crop and
    resize run in PIL (``__call__``) or in torchvision on a uint8 tensor, CPU or GPU (``on_tensor``).
    ``draft``: an image given still undecoded (``Image.open``) is decoded by ``jpeg_draft`` at a
    reduced DCT scale when the crop is at least twice the output; the crop and flip draws are the
    same, the pixels differ slightly (docs/DATA.md). ``output``: "float" (normalised float32) or
    "uint8" (the same view before ToTensor/Normalize: ``to_normalized_tensor`` of it is the float one)."""

    def __init__(self, size: int, scale=(0.2, 1.0), draft: bool = False, output: str = "float"):
        if output not in OUTPUTS:
            raise DataError(f"output {output!r}: one of {', '.join(OUTPUTS)}")
        self.size = int(size)
        self.scale = tuple(scale)
        self.draft = draft
        self.output = output

    def draw(self, width: int, height: int, sample_seed: int):
        """(left, top, w, h) crop box and flip, from the sample seed and the image size only."""
        rng = np.random.default_rng(sample_seed)
        box = random_resized_crop_box(width, height, rng, self.scale)
        return box, bool(rng.random() < 0.5)

    def finish(self, view: torch.Tensor) -> torch.Tensor:
        """uint8 (3, size, size) -> what ``output`` asks for."""
        return view if self.output == "uint8" else to_normalized_tensor(view)

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
        return self.finish(pil_to_uint8(out))

    def crop_tensor(self, img: torch.Tensor, box, flip: bool) -> torch.Tensor:
        """uint8 (3, H, W) on any device -> uint8 (3, size, size): torchvision's resized_crop
        (bicubic, antialiased) of ``box`` = (left, top, w, h), then the flip."""
        from torchvision.transforms.v2 import InterpolationMode, functional as TF
        left, top, w, h = box
        out = TF.resized_crop(img, top, left, h, w, [self.size, self.size],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)  # (3, size, size) uint8
        return out.flip(-1) if flip else out

    def on_tensor(self, img: torch.Tensor, sample_seed: int) -> torch.Tensor:
        """The same draws on a decoded uint8 (3, H, W) tensor, cropped and resized by torchvision:
        ``decode="torchvision"``."""
        box, flip = self.draw(img.shape[-1], img.shape[-2], sample_seed)
        return self.finish(self.crop_tensor(img, box, flip))


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
    """Common ``__getitem__``: ``(index, sample_seed)`` -> augmented view, ``index`` -> eval view.

    ``decode``: a mode of ``resolve_decode`` (resolved: not "auto"); ``output``: the training
    view's dtype, "float" (normalised) or "uint8" (the evaluation view is always float)."""

    def __init__(self, size: int, scale=(0.2, 1.0), decode: str = "pil", output: str = "float"):
        self.decode = decode
        self.train_transform = TrainTransform(size, scale, draft=decode == "pil-draft", output=output)
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

    def train_view(self, index: int, sample_seed: int, decode: str = None) -> torch.Tensor:
        """The training view of ``index``; ``decode`` overrides the data set's mode (the CPU twin
        of a failed GPU decode)."""
        return self.train_transform(self.image(index), sample_seed)

    def load(self, key: Key, decode: str = None) -> Tuple[torch.Tensor, Tuple[BadFile, ...]]:
        """(sample, bad files): the sample of ``key``, or, when its image is unreadable, of a
        substitute ``(index, sample_seed)`` drawn from ``key`` alone (attempt after attempt while
        the substitutes are unreadable too), with the ``(path, reason)`` of each file passed over."""
        bad = []
        cur = key
        for attempt in range(MAX_SUBSTITUTES + 1):
            try:
                if decode is not None and isinstance(cur, (tuple, list)):
                    return self.train_view(int(cur[0]), int(cur[1]), decode), tuple(bad)
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


class GpuJpeg(NamedTuple):
    """A training view left to the GPU (``decode="gpu"``): the JPEG's bytes (uint8 (n,)), the crop
    box (left, top, w, h) and flip drawn from its header's size, and its key (for a CPU retry)."""
    data: torch.Tensor
    box: Tuple[int, int, int, int]
    flip: bool
    key: Tuple[int, int]


class EncodedImages(_Images):
    """Images stored encoded (files, tar members): ``encoded(index)`` gives the bytes and
    ``source(index)`` the name an error shows; decoding follows ``decode``:

    * "pil": PIL decodes the whole image, PIL crops and resizes;
    * "pil-draft": PIL decodes JPEGs at a reduced DCT scale when the crop is >= 2x the output;
    * "torchvision": ``torchvision.io.decode_image`` (RGB) then ``resized_crop`` on the tensor;
    * "gpu": JPEGs leave the worker undecoded (``GpuJpeg``: bytes + crop drawn from the header's
      size), decoded batched on the GPU by ``decode_gpu_batch``; other formats as "torchvision".

    All make the same crop and flip draws; the evaluation view is PIL in every mode."""

    def encoded(self, index: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def source(self, index: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, index: int) -> bytes:
        try:
            return self.encoded(index)
        except Exception as e:
            raise _unreadable(self.source(index), e) from e

    def image(self, index: int) -> Image.Image:
        data = self._read(index)
        try:
            return Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise _unreadable(self.source(index), e) from e

    def train_view(self, index: int, sample_seed: int, decode: str = None):
        decode = decode or self.decode
        if decode == "pil":
            return super().train_view(index, sample_seed)
        data = self._read(index)
        try:
            if decode == "pil-draft":  # decoded inside the transform, after the crop is known
                return self.train_transform(Image.open(io.BytesIO(data)), sample_seed)
            if decode == "gpu":
                with Image.open(io.BytesIO(data)) as img:  # the header only: format and size
                    fmt, (width, height) = img.format, img.size
                if fmt == "JPEG":
                    box, flip = self.train_transform.draw(width, height, sample_seed)
                    return GpuJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip,
                                   (index, sample_seed))
            return self.train_transform.on_tensor(_decode_tensor(data), sample_seed)
        except Exception as e:
            raise _unreadable(self.source(index), e) from e


def _decode_tensor(data: bytes) -> torch.Tensor:
    """Encoded bytes -> uint8 (3, H, W) RGB, torchvision on the CPU."""
    from torchvision.io import ImageReadMode, decode_image
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_gpu_batch(samples: Sequence, device: torch.device, dataset) -> Tuple[torch.Tensor, Tuple[BadFile, ...]]:
    """``decode="gpu"``: a batch of ``GpuJpeg`` (and views the workers already made) -> (images
    (N, 3, size, size) on ``device``, bad files). The JPEGs are decoded in one batched
    ``torchvision.io.decode_jpeg(device=...)`` call, then cropped, resized and flipped on the GPU;
    a JPEG the GPU decoder rejects is loaded again on the CPU (``dataset.load(key, "torchvision")``),
    substituted there if it is unreadable, and reported in the bad files."""
    from torchvision.io import ImageReadMode, decode_jpeg
    jpeg_at = [k for k, s in enumerate(samples) if isinstance(s, GpuJpeg)]
    decoded = {}  # position in the batch -> uint8 (3, H, W) on device
    if jpeg_at:
        try:
            images = decode_jpeg([samples[k].data for k in jpeg_at], mode=ImageReadMode.RGB, device=device)
            decoded = dict(zip(jpeg_at, images))
        except Exception:  # one bad JPEG fails the whole batch: decode them one by one
            for k in jpeg_at:
                try:
                    decoded[k] = decode_jpeg(samples[k].data, mode=ImageReadMode.RGB, device=device)
                except Exception:
                    pass  # retried on the CPU below
    out, bad = [], []
    transform = dataset.train_transform
    for k, s in enumerate(samples):
        if not isinstance(s, GpuJpeg):
            out.append(s.to(device, non_blocking=True))
        elif k in decoded:
            out.append(transform.finish(transform.crop_tensor(decoded[k], s.box, s.flip)))
        else:
            view, passed_over = dataset.load(s.key, "torchvision")
            out.append(view.to(device))
            bad += passed_over
    return torch.stack(out, 0), tuple(bad)


class ImageFolder(EncodedImages):
    """``root/<class>/<image>`` (ImageNet layout). ``root/train`` is used when it exists.

    Classes are the sorted sub-folders (labels 0..K-1); image files are found recursively inside
    each class folder. Images directly under ``root`` (no class folders) form a single class.
    ``decode``: one of ``DECODE_MODES`` ("auto": torchvision when it imports, else PIL; see
    ``EncodedImages`` and ``resolve_decode``); ``cuda``: whether "gpu" may run here.
    """
    DECODE_MODES = DECODE_MODES

    def __init__(self, root: str, size: int, scale=(0.2, 1.0), decode: str = "auto", output: str = "float",
                 cuda: bool = False):
        mode, self.decode_why = resolve_decode(decode, cuda)
        super().__init__(size, scale, mode, output)
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

    def source(self, index: int) -> str:
        return self.samples[index][0]

    def encoded(self, index: int) -> bytes:
        with open(self.samples[index][0], "rb") as f:
            return f.read()

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
    ``decode``: the photos are decoded once, in memory; "auto" crops them with torchvision when it
    imports (uint8 tensors), else with PIL; "pil-draft" and "gpu" have nothing to decode here (PIL
    and "auto" respectively, with the reason in ``decode_why``).
    """

    def __init__(self, size: int, length: int = 4096, scale=(0.2, 1.0), decode: str = "auto",
                 output: str = "float"):
        mode, self.decode_why = resolve_decode("auto" if decode == "gpu" else decode)
        if decode in ("pil-draft", "gpu"):
            mode, self.decode_why = ("pil" if decode == "pil-draft" else mode), \
                f"--decode {decode}: the built-in photos are decoded once, in memory; cropped with {mode}"
        super().__init__(size, scale, mode, output)
        if length < 1:
            raise DataError(f"the built-in data set needs a positive length, got {length}")
        self.photos, self.photo_names, self.faces = _builtin_sources()
        self.length = int(length)
        self._tensors = {}  # id(photo) -> uint8 (3, H, W), made on first use in each process

    def train_view(self, index: int, sample_seed: int, decode: str = None) -> torch.Tensor:
        if (decode or self.decode) != "torchvision":
            return super().train_view(index, sample_seed)
        img = self.image(index)
        t = self._tensors.get(id(img))
        if t is None:
            t = self._tensors[id(img)] = pil_to_uint8(img)
        return self.train_transform.on_tensor(t, sample_seed)

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
