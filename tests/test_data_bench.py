"""``mae-fast bench-data``: the loader alone, timed, on the built-in data and an ImageFolder (with an
unreadable file, counted), one row per worker count; bad arguments give a clear error."""
import re

import pytest

from mae_fast import cli

from test_data_bad_files import _write_tree

SMALL = ["--input-size", "16", "--batch-size", "4", "--batches", "2", "--warmup", "1", "--num-threads", "1"]


def _rows(out):
    """{workers: (img/s, dtype, bad)} from the printed table."""
    rows = {}
    for line in out.splitlines():
        m = re.fullmatch(r"\s*([\w-]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\w+)\s+(\d+)\s+(\d+)", line)
        if m:
            rows[(m[1], int(m[2]))] = (float(m[3]), m[5], int(m[7]))
    return rows


def test_bench_data_builtin_two_worker_counts(capsys):
    assert cli.main(["bench-data", *SMALL, "--builtin-size", "16", "--num-workers", "0,1", "--decode", "pil"]) == 0
    out = capsys.readouterr().out
    assert "built-in" in out
    rows = _rows(out)
    assert sorted(rows) == [("pil", 0), ("pil", 1)]
    assert all(img_s > 0 and dtype == "float32" and bad == 0 for img_s, dtype, bad in rows.values())


def test_bench_data_uint8_and_float_batches(capsys):
    assert cli.main(["bench-data", *SMALL, "--builtin-size", "16", "--input-dtype", "float,uint8"]) == 0
    out = capsys.readouterr().out
    dtypes = [line.split()[4] for line in out.splitlines() if re.fullmatch(r"\s*[\w-]+\s+0\s+[\d.].*", line)]
    assert dtypes == ["float32", "uint8"]
    assert "KiB/img" in out and "float batches" in out and "uint8 batches" in out


def test_bench_data_on_tar_shards(tmp_path, capsys):
    from test_data_shards import write_shards
    spec = write_shards(tmp_path, n_shards=2)
    assert cli.main(["bench-data", *SMALL, "--data-path", spec, "--decode", "pil"]) == 0
    out = capsys.readouterr().out
    assert "tar shards" in out and "2 shard(s), 8 images" in out
    assert list(_rows(out)) == [("pil", 0)]


def test_bench_data_image_folder_counts_bad_files(tmp_path, capsys):
    # 11 images (3 unreadable), batch 4: 2 batches an epoch, the timed batches run into epoch 1
    root = _write_tree(tmp_path / "d")
    assert cli.main(["bench-data", *SMALL, "--data-path", str(root), "--batches", "6",
                     "--decode", "pil,pil-draft"]) == 0
    out = capsys.readouterr().out
    assert "ImageFolder" in out
    rows = _rows(out)
    assert sorted(rows) == [("pil", 0), ("pil-draft", 0)]
    for img_s, dtype, bad in rows.values():
        assert img_s > 0 and bad > 0  # 24 samples over 3 epochs of 8 of the 11 images: some were bad


@pytest.mark.parametrize("args, message", [
    (["--num-workers", "two"], "--num-workers 'two'"),
    (["--num-workers", "-1"], "--num-workers '-1'"),
    (["--batch-size", "64", "--builtin-size", "16"], "no full batch of 64"),
    (["--batches", "0"], "--batches must be > 0"),
    (["--data-path", "/no/such/folder"], "does not exist"),
    (["--decode", "nvjpeg"], "decode mode 'nvjpeg'"),
    (["--input-dtype", "half"], "--input-dtype 'half'"),
    (["--data-path", "/no/such/shards-{0..3}.tar"], "4 of 4 shard(s) do not exist"),
])
def test_bench_data_bad_arguments(capsys, args, message):
    assert cli.main(["bench-data", *SMALL, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
