"""WebDataset tar shards (``--data-path 'shards-{000000..000099}.tar'``), read with the stdlib.

The format is WebDataset's: plain (uncompressed) tar files whose members are grouped into samples by
their key, the member path up to the first dot of its file name (``n01440764/x123.jpg`` and
``n01440764/x123.cls`` are one sample ``n01440764/x123``). A sample's image is its first member with
an image extension (jpg, jpeg, png, webp, ...); its label is the integer in its ``cls`` member when
there is one (else 0; read when asked for); other members are ignored, and a sample without an
image is skipped (counted).

How it is read: once, at start-up, every shard's headers are listed (read directly for plain
ustar/GNU tars, else by ``tarfile``; both seek over the member data: no image is read), giving each
image member's shard, byte offset and size; a sample is then one ``os.pread`` of those bytes. So the
shards form an ordinary indexed data set and take the trainer's usual path: the
``DistributedSampler`` splits the samples across DDP ranks (disjoint), ``DataLoader`` workers build
whole batches, the crop/flip come from the ``(index, sample_seed)`` keys, and a resumed run reads
exactly the samples an uninterrupted one would (exact resume, any number of workers). The cost: each
rank reads its samples from every shard in random order (random reads, fine on local disks and
parallel file systems; for object stores that only stream, WebDataset's own sequential
shard-per-worker reader is the tool, not built here: its resume is not exact).
"""
import os
import re
import tarfile
from typing import List, Tuple

from .data import IMG_EXTENSIONS, DataError, EncodedImages, resolve_decode

IMAGE_EXTS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> List[str]:
    """``shards-{000000..000002}.tar`` -> the three names (zero padding kept as written);
    ``{a,b}`` lists too; several braces multiply out."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = _RANGE.fullmatch(m.group(0))
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise DataError(f"--data-path {pattern!r}: the range {m.group(0)} runs backwards")
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise DataError(f"--data-path {pattern!r}: {m.group(0)} is neither a range {{000..099}} nor a list {{a,b}}")
    return [name for c in choices for name in expand_braces(pattern[:m.start()] + c + pattern[m.end():])]


def is_shard_spec(path) -> bool:
    """Whether ``--data-path`` names tar shards (a ``.tar`` file or brace pattern) rather than a folder."""
    return os.fspath(path).rstrip("/").endswith(".tar")


def _split_key(name: str) -> Tuple[str, str]:
    """WebDataset's (key, extension): the path up to the first dot of the file name, and the rest."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def _ustar_members(path: str):
    """[(name, data offset, size)] of the regular files of a plain ustar/GNU tar, from its 512-byte
    headers read directly (checksums verified); None when the shard needs ``tarfile`` (pax or GNU
    long-name headers, sparse or huge members, a bad checksum, a compressed or truncated file).
    ``tarfile`` gives the same list, about 10x slower (docs/DATA.md)."""
    members = []
    with open(path, "rb") as f:
        pos = 0
        while True:
            f.seek(pos)
            h = f.read(512)
            if len(h) < 512:
                return None  # no end-of-archive block: let tarfile judge
            if h.count(0) == 512:
                return members  # end of archive
            try:
                checksum = int(h[148:156].strip(b"\0 ") or b"-1", 8)
                size = int(h[124:136].strip(b"\0 ") or b"0", 8)
            except ValueError:  # base-256 numbers, garbage
                return None
            if checksum != sum(h[:148]) + 256 + sum(h[156:]):
                return None
            kind = h[156:157]
            if kind not in (b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"):
                return None  # pax ('x', 'g'), GNU long names ('L', 'K'), sparse ('S'), ...
            if kind in (b"0", b"\0", b"7"):
                name = h[:100].split(b"\0", 1)[0]
                if h[257:263] == b"ustar\0":  # POSIX: a path prefix; GNU ("ustar  ") has none
                    prefix = h[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix + b"/" + name
                members.append((name.decode("utf-8", "surrogateescape"), pos + 512, size))
            pos += 512 + (size + 511) // 512 * 512


def _tarfile_members(path: str):
    with tarfile.open(path, "r:") as tar:  # "r:": uncompressed only (a member must be at a byte offset)
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile() and not m.issparse()]


def index_shard(path: str):
    """([(key, image offset, image size, cls offset, cls size)], samples without an image) of one
    shard (cls offset -1: no ``cls`` member). Headers only: the labels are read when asked for."""
    try:
        members = _ustar_members(path)
        if members is None:
            members = _tarfile_members(path)
    except tarfile.ReadError as e:
        raise DataError(f"shard {path!r} is not an uncompressed tar file ({e}); compressed shards cannot be "
                        f"read at an offset: store them as plain .tar") from e
    except OSError as e:
        raise DataError(f"cannot read shard {path!r}: {type(e).__name__}: {e}") from e
    samples, no_image = [], 0
    current = None  # [key, image offset, image size, cls offset, cls size]
    for name, offset, size in members + [(None, 0, 0)]:  # a sentinel closes the last sample
        key, ext = _split_key(name) if name is not None else (None, "")
        if current is not None and key != current[0]:
            if current[1] is None:
                no_image += 1
            else:
                samples.append(tuple(current))
        if name is None:
            break
        if current is None or key != current[0]:
            current = [key, None, None, -1, 0]
        if ext in IMAGE_EXTS and current[1] is None:
            current[1], current[2] = offset, size
        elif ext == "cls":
            current[3], current[4] = offset, size
    return samples, no_image


class TarShards(EncodedImages):
    """The image samples of WebDataset tar shards ``spec`` (a ``.tar`` path, brace pattern allowed),
    in shard order then member order. ``decode``/``output``/``cuda`` as ``ImageFolder``."""

    def __init__(self, spec: str, size: int, scale=(0.2, 1.0), decode: str = "auto", output: str = "float",
                 cuda: bool = False):
        mode, self.decode_why = resolve_decode(decode, cuda)
        super().__init__(size, scale, mode, output)
        spec = os.path.expanduser(os.fspath(spec))
        self.root = spec
        self.shards = expand_braces(spec)
        missing = [p for p in self.shards if not os.path.isfile(p)]
        if missing:
            raise DataError(f"--data-path {spec!r}: {len(missing)} of {len(self.shards)} shard(s) do not exist "
                            f"(first: {missing[0]!r})")
        self.samples = []  # (shard number, image offset, image size, key, cls offset, cls size)
        self.skipped = 0  # samples without an image member
        for n, path in enumerate(self.shards):
            found, no_image = index_shard(path)
            self.samples += [(n, off, nbytes, key, cls_off, cls_size) for key, off, nbytes, cls_off, cls_size in found]
            self.skipped += no_image
        if not self.samples:
            raise DataError(f"--data-path {spec!r}: the {len(self.shards)} shard(s) hold no image member "
                            f"({', '.join(IMAGE_EXTS)})")
        self._files = {}  # (pid, shard number) -> file descriptor: a forked worker opens its own
        self._classes = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def source(self, index: int) -> str:
        n, key = self.samples[index][0], self.samples[index][3]
        return f"{self.shards[n]}:{key}"

    def _pread(self, n: int, offset: int, nbytes: int) -> bytes:
        fd = self._files.get((os.getpid(), n))
        if fd is None:
            fd = self._files[(os.getpid(), n)] = os.open(self.shards[n], os.O_RDONLY)
        data = os.pread(fd, nbytes, offset)
        if len(data) != nbytes:
            raise OSError(f"shard ends after {len(data)} of the member's {nbytes} bytes")
        return data

    def encoded(self, index: int) -> bytes:
        n, offset, nbytes = self.samples[index][:3]
        return self._pread(n, offset, nbytes)

    def label(self, index: int) -> int:
        """The integer in the sample's ``cls`` member (0 without one); read on demand (probes only)."""
        n, _, _, key, cls_offset, cls_size = self.samples[index]
        if cls_offset < 0:
            return 0
        text = self._pread(n, cls_offset, cls_size).decode("utf-8", "replace").strip()
        try:
            return int(text)
        except ValueError:
            raise DataError(f"shard {self.shards[n]!r}: {key}.cls holds {text[:40]!r}, not an integer class") from None

    @property
    def classes(self) -> list:
        """The sorted labels (reads every ``cls`` member once: for probes and the run header)."""
        if self._classes is None:
            self._classes = sorted({self.label(i) for i in range(len(self))})
        return self._classes

    def __del__(self):
        for fd in getattr(self, "_files", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass
