"""The neutral helpers: safe paths, crash-safe writes, typed reads, weights checks, dtypes."""

import os

import pytest
import torch

from lightning_interp._dtypes import dtype_from_name, dtype_name
from lightning_interp._io import (
    atomic_write,
    check_folder_name,
    read_json,
    remove_stale_temporaries,
    safe_join,
)
from lightning_interp._weights import check_tensors
from lightning_interp.errors import (
    ConfigError,
    ConfigTypeError,
    CorruptFileError,
    DictionaryNotFoundError,
    UnsafePathError,
)


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/b", "/etc", "a\\b", ".hidden", "x\x00y", "a b", 3]
)
def test_check_folder_name_refuses_anything_but_one_plain_level(name):
    with pytest.raises(UnsafePathError, match="folder name"):
        check_folder_name(name, "site")


@pytest.mark.parametrize("name", ["layers.6.resid_post", "blocks.8.hook_resid_pre", "a-b_c"])
def test_check_folder_name_accepts_site_names(name):
    assert check_folder_name(name) == name


@pytest.mark.parametrize("part", ["../x", "a/../../x", "/abs/path", "a\\..\\b", "", "C:/x"])
def test_safe_join_refuses_paths_that_leave(tmp_path, part):
    if part == "C:/x" and os.name != "nt":
        part = "/C:/x"  # the POSIX spelling of an absolute path
    with pytest.raises(UnsafePathError, match="leave|outside"):
        safe_join(tmp_path, part)


def test_safe_join_follows_symlinks_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside"):
        safe_join(root, "link/file.json")


def test_safe_join_keeps_nested_relative_paths(tmp_path):
    assert safe_join(tmp_path, "layer_3/width_16k", "params.npz") == (
        tmp_path / "layer_3" / "width_16k" / "params.npz"
    )


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model.safetensors"

    def explode(path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, explode)
    assert list(tmp_path.iterdir()) == []


def test_read_json_types_every_failure(tmp_path):
    path = tmp_path / "x.json"
    with pytest.raises(DictionaryNotFoundError, match="is missing"):
        read_json(path)
    for content in (b"{", b"\xff\xfe", b"[1, 2]"):
        path.write_bytes(content)
        with pytest.raises(CorruptFileError, match="x.json"):
            read_json(path)


def test_check_tensors_takes_a_plain_shape_map(tmp_path):
    shapes = {"a": (2, 3), "b": (4,)}
    check_tensors(shapes, {"a": torch.zeros(2, 3), "b": torch.zeros(4)}, "f")
    with pytest.raises(CorruptFileError) as info:
        check_tensors(shapes, {"a": torch.zeros(3, 2), "c": torch.zeros(1)}, "f")
    message = str(info.value)
    assert "missing tensors ['b']" in message and "unexpected tensors ['c']" in message
    assert "a has shape (3, 2), config implies (2, 3)" in message


def test_temporaries_of_a_live_writer_are_kept(tmp_path):
    live = tmp_path / f".model.safetensors.{os.getppid()}.0a1b2c3d.tmp"  # our parent: alive
    dead = tmp_path / ".model.safetensors.999999999.0a1b2c3d.tmp"  # beyond any pid_max
    legacy = tmp_path / ".config.json.k2x_9qzt.tmp"  # mkstemp's name, before pids
    other = tmp_path / ".notes.txt.999999999.0a1b2c3d.tmp"  # not a file we write
    for path in (live, dead, legacy, other):
        path.write_bytes(b"partial")
    removed = remove_stale_temporaries(tmp_path, ["model.safetensors", "config.json"])
    assert sorted(removed) == sorted([dead, legacy])
    assert live.exists() and other.exists()


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bfloat16", torch.bfloat16),
        ("torch.float32", torch.float32),
        (torch.float16, torch.float16),
    ],
)
def test_dtype_names_round_trip(name, dtype):
    assert dtype_from_name(name) is dtype
    assert dtype_from_name(dtype_name(dtype)) is dtype


@pytest.mark.parametrize(
    ("name", "error"),
    [("int8", ConfigError), (torch.int64, ConfigError), (["float32"], ConfigTypeError)],
)
def test_dtype_from_name_refuses_what_weights_cannot_be(name, error):
    with pytest.raises(error, match="float32"):
        dtype_from_name(name)


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    from lightning_interp._io import folder_replaced_atomically

    out = tmp_path / "store"
    with folder_replaced_atomically(out) as building:
        (building / "a.json").write_text("1")
        assert not out.exists()  # nothing visible before the block ends
    assert (out / "a.json").read_text() == "1"
    with pytest.raises(RuntimeError), folder_replaced_atomically(out, replace=True) as building:
        (building / "a.json").write_text("2")
        raise RuntimeError("killed halfway")
    assert (out / "a.json").read_text() == "1"  # the old folder stays
    with folder_replaced_atomically(out, replace=True) as building:
        (building / "b.json").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temporaries left
