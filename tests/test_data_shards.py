"""WebDataset tar shards (``--data-path 'shards-{000000..000002}.tar'``, mae_fast.shards): written here
with the stdlib tarfile, they give the very pixels of the same images in an ImageFolder, a corrupt
member is substituted like a corrupt file, workers see what the main process sees, bad shard specs
are clear errors, and a 2-process gloo DDP run trains on them with disjoint samples per rank."""
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast.data import DataError, ImageFolder, UnreadableImage
from mae_fast.shards import TarShards, expand_braces, is_shard_spec
from mae_fast.train.loader import EpochBatches, build_loader

from test_pretrain import TINY, read_log


def _image_bytes(rng, fmt):
    h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root, n_shards=3, per_shard=4, folder=None, corrupt=False):
    """``n_shards`` tars of ``per_shard`` samples (``<key>.jpg`` or ``.png`` + ``<key>.cls``), plus in
    shard 0 a sample with no image (skipped) and, with ``corrupt``, a truncated JPEG; with ``folder``
    the same images as an ImageFolder (class = cls), in the same order. Returns the brace pattern."""
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    n = 0
    for s in range(n_shards):
        with tarfile.open(os.path.join(root, f"shards-{s:06d}.tar"), "w") as tar:
            if s == 0:
                _add(tar, "meta/no_image.cls", b"1")
                _add(tar, "meta/no_image.json", b"{}")
            for _ in range(per_shard):
                fmt, ext = ("PNG", "png") if n % 3 == 0 else ("JPEG", "jpg")
                data, label = _image_bytes(rng, fmt), n % 2
                key = f"c{label}/{n:04d}"
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.cls", str(label).encode())
                if folder is not None:
                    os.makedirs(os.path.join(folder, f"c{label}"), exist_ok=True)
                    with open(os.path.join(folder, f"c{label}", f"{n:04d}.{ext}"), "wb") as f:
                        f.write(data)
                n += 1
            if corrupt and s == n_shards - 1:
                data = _image_bytes(rng, "JPEG")
                _add(tar, "bad/truncated.jpg", data[: len(data) // 2])
    return os.path.join(root, f"shards-{{000000..{n_shards - 1:06d}}}.tar")


def test_expand_braces():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("a-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar"]
    assert expand_braces("{x,y}/s-{0..1}.tar") == ["x/s-0.tar", "x/s-1.tar", "y/s-0.tar", "y/s-1.tar"]
    assert expand_braces("one.tar") == ["one.tar"]
    assert is_shard_spec("d/s-{0..3}.tar") and is_shard_spec("one.tar") and not is_shard_spec("folder")
    with pytest.raises(DataError, match="runs backwards"):
        expand_braces("s-{5..1}.tar")
    with pytest.raises(DataError, match="neither a range"):
        expand_braces("s-{5}.tar")


def test_shards_give_the_pixels_of_the_same_images_in_an_image_folder(tmp_path):
    spec = write_shards(tmp_path / "shards", folder=tmp_path / "folder")
    for decode in ("pil", "auto"):
        shards = TarShards(spec, 16, decode=decode)
        folder = ImageFolder(tmp_path / "folder", 16, decode=decode)
        assert len(shards) == len(folder) == 12 and shards.skipped == 1  # the sample without an image
        assert [shards.label(i) for i in range(12)] == [i % 2 for i in range(12)]
        assert shards.source(5) == str(tmp_path / "shards" / "shards-000001.tar") + ":c1/0005"
        # ImageFolder lists class c0 then c1: the sample n is at index (n % 2) * 6 + n // 2 there
        for n, key_seed in [(0, 11), (1, 12), (5, 13), (10, 14)]:
            a, b = shards[(n, key_seed)], folder[((n % 2) * 6 + n // 2, key_seed)]  # (3, 16, 16)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(shards[3], folder[7], rtol=0, atol=0)  # the evaluation view


def test_corrupt_member_is_substituted_and_named(tmp_path):
    shards = TarShards(write_shards(tmp_path, n_shards=2, corrupt=True), 16)
    bad = len(shards) - 1
    assert shards.source(bad).endswith("shards-000001.tar:bad/truncated")
    with pytest.raises(UnreadableImage, match="truncated"):
        shards[(bad, 3)]
    img, passed_over = shards.load((bad, 3))
    assert img.shape == (3, 16, 16) and passed_over[0][0] == shards.source(bad)


def test_workers_read_the_shards_like_the_main_process(tmp_path):
    shards = TarShards(write_shards(tmp_path), 16)
    out = []
    for workers in (0, 2):
        batches = EpochBatches(shards, batch_size=4, seed=1)
        batches.set_epoch(1)
        out.append(torch.cat([b for b, _ in build_loader(shards, batches, workers, torch.device("cpu"))]))
    assert out[0].shape == (12, 3, 16, 16)
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)


def test_a_resumed_epoch_reads_the_same_samples_and_pixels(tmp_path):
    """What exact resume needs of the data: an epoch resumed after k batches (EpochBatches skip, as
    --resume sets it) yields the very batches the uninterrupted epoch yielded from batch k on."""
    shards = TarShards(write_shards(tmp_path), 16)
    whole = EpochBatches(shards, batch_size=4, seed=2)
    whole.set_epoch(3)
    resumed = EpochBatches(shards, batch_size=4, seed=2)
    resumed.set_epoch(3, skip=1)
    a = [b for b, _ in build_loader(shards, whole, 0, torch.device("cpu"))]
    b = [b for b, _ in build_loader(shards, resumed, 1, torch.device("cpu"))]
    assert len(a) == 3 and len(b) == 2
    torch.testing.assert_close(torch.stack(b), torch.stack(a[1:]), rtol=0, atol=0)


def test_bad_shard_specs_are_clear_errors(tmp_path):
    spec = write_shards(tmp_path, n_shards=2)
    with pytest.raises(DataError, match="1 of 3 shard"):
        TarShards(spec.replace("000001}", "000002}"), 16)
    with tarfile.open(tmp_path / "z.tar", "w:gz") as tar:
        _add(tar, "a.jpg", b"x")
    with pytest.raises(DataError, match="not an uncompressed tar"):
        TarShards(str(tmp_path / "z.tar"), 16)
    with tarfile.open(tmp_path / "empty.tar", "w") as tar:
        _add(tar, "a.txt", b"x")
    with pytest.raises(DataError, match="hold no image"):
        TarShards(str(tmp_path / "empty.tar"), 16)


# a pretrain run under torchrun that writes the indices each rank trained on
_RECORDING_RUN = """
import os, sys
from mae_fast import pretrain, shards
seen = open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.txt"), "w")
train_view = shards.TarShards.train_view
def recording(self, index, sample_seed, decode=None):
    seen.write(f"{index}\\n"); seen.flush()
    return train_view(self, index, sample_seed, decode)
shards.TarShards.train_view = recording
sys.exit(pretrain.main(sys.argv[2:]))
"""


def test_ddp_two_processes_gloo_on_shards(tmp_path):
    spec = write_shards(tmp_path / "shards", n_shards=4, per_shard=4)  # 16 images
    script = tmp_path / "run.py"
    script.write_text(_RECORDING_RUN)
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), *TINY, "--epochs", "1", "--num-preview", "0", "--data-path", spec,
           "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tar shards" in proc.stdout and "4 shard(s), 16 images" in proc.stdout
    assert read_log(out)[0] == [0, 1]  # 16 samples / (2 processes x batch 4)
    seen = [[int(x) for x in (tmp_path / f"rank{r}.txt").read_text().split()] for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8  # 2 steps x batch 4 on each rank
    assert len(set(seen[0])) == 8 and not set(seen[0]) & set(seen[1])  # disjoint: each image once


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_direct_header_reader_lists_what_tarfile_lists(tmp_path, fmt):
    from mae_fast import shards
    path = tmp_path / "s.tar"
    names = ["a/0.jpg", "a/0.cls", "b" * 60 + "/" + "c" * 60 + ".png", "d.jpg"]  # 121 chars: ustar prefix
    with tarfile.open(path, "w", format=fmt) as tar:
        for n, name in enumerate(names):
            _add(tar, name, bytes(range(n + 1)) * 300)
        tar.addfile(_dir("a/sub"))  # not a file: left out
    want = shards._tarfile_members(str(path))
    assert [m[0] for m in want] == names
    got = shards._ustar_members(str(path))
    if fmt == tarfile.USTAR_FORMAT:
        assert got == want  # the long name sits in the ustar prefix field
    else:
        assert got is None  # GNU long-name / pax header: tarfile reads this shard
        short = tmp_path / "short.tar"  # without the long name the header reader takes it
        with tarfile.open(short, "w", format=fmt) as tar:
            for name in names[:2] + names[3:]:
                _add(tar, name, b"xyz" * 200)
        assert shards._ustar_members(str(short)) == shards._tarfile_members(str(short))
    assert shards.index_shard(str(path))[0][0][:3] == ("a/0", want[0][1], want[0][2])
    # the reader's offsets are the members' bytes
    with open(path, "rb") as f:
        for n, (_, offset, size) in enumerate(want):
            f.seek(offset)
            assert f.read(size) == bytes(range(n + 1)) * 300


def _dir(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info
