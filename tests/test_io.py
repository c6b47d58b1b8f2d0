import os

import pytest

from lightning_interp._io import check_folder_name, safe_join
from lightning_interp.errors import UnsafePathError


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
