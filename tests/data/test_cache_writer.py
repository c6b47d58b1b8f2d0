"""One writer per cache folder, crash-consistent replacement, and the empty cache refused."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from lightning_interp.data import cache_writer
from lightning_interp.data.cache import ActivationCache, ActivationCacheWriter
from lightning_interp.data.lock import LOCK_NAME, FolderLock
from lightning_interp.errors import EmptyCacheError, FolderInUseError


def writer(folder, **kwargs):
    return ActivationCacheWriter(folder, sites=["a"], widths={"a": 4}, shard_tokens=16, **kwargs)


def old_cache(folder) -> torch.Tensor:
    rows = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    with writer(folder) as w:
        w.add(rows)
    return rows


def listed_files(folder) -> list[str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return sorted(["manifest.json", *(shard["file"] for shard in manifest["shards"])])


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid runs no process now
    return child.pid


# ---------------------------------------------------------------------- one writer per folder
def test_a_second_writer_on_a_folder_is_refused(tmp_path):
    first = writer(tmp_path)
    first.add(torch.ones(20, 4))
    with pytest.raises(FolderInUseError) as caught:
        writer(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message and f"process {os.getpid()}" in message
    assert "another folder" in message and "delete" in message
    assert isinstance(caught.value, OSError)
    first.add(torch.ones(20, 4))  # the refused writer touched nothing of the first one's
    first.close()
    assert ActivationCache(tmp_path).total_tokens == 40
    assert not (tmp_path / LOCK_NAME).exists()
    second = writer(tmp_path, overwrite=True)  # free again once the first one closed
    second.abort()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork for a second process")
def test_a_writer_in_another_process_holds_the_folder_until_it_dies(tmp_path):
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: opens a writer, says so, then waits to be killed
        try:
            held = writer(tmp_path)
            held.add(torch.ones(20, 4))
            os.write(ready_write, b"1")
            signal.pause()
        finally:
            os._exit(3)
    os.close(ready_write)  # so a child that died early reads as end of file, not a hang
    try:
        assert os.read(ready_read, 1) == b"1"
        with pytest.raises(FolderInUseError, match=f"process {pid} on"):
            writer(tmp_path)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_read)
    with writer(tmp_path) as w:  # the dead child's lock and shard are taken over
        w.add(torch.ones(3, 4))
    assert sorted(os.listdir(tmp_path)) == listed_files(tmp_path)
    assert ActivationCache(tmp_path).total_tokens == 3


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    owner = {"pid": dead_pid(), "host": socket.gethostname(), "token": "old"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(owner))
    with writer(tmp_path) as w:
        w.add(torch.ones(5, 4))
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["token"] != "old"
    assert sorted(os.listdir(tmp_path)) == listed_files(tmp_path)


def test_locks_that_cannot_be_proven_stale_are_kept(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": dead_pid(), "host": "another-host", "token": "x"}))
    with pytest.raises(FolderInUseError, match="another-host"):
        writer(tmp_path)
    lock.write_text("")  # being created right now by a starting writer
    with pytest.raises(FolderInUseError, match="being created"):
        writer(tmp_path)
    os.utime(lock, (0, 0))  # ... or left empty long ago by one that died at once
    writer(tmp_path).abort()
    assert not lock.exists() and os.listdir(tmp_path) == []


def test_release_never_removes_a_lock_taken_over_by_someone_else(tmp_path):
    lock = FolderLock(tmp_path).acquire()
    other = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": "other"})
    (tmp_path / LOCK_NAME).write_text(other)
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == other


def test_an_unclosed_writer_releases_the_folder_when_collected(tmp_path):
    forgotten = writer(tmp_path / "cache")
    forgotten.add(torch.ones(40, 4))  # two shards on disk
    del forgotten
    gc.collect()
    assert not (tmp_path / "cache").exists()  # its shards, lock and folder are gone


# ---------------------------------------------------------------------- nothing lost
def test_a_failed_overwrite_leaves_the_old_cache(tmp_path):
    rows = old_cache(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RuntimeError, match="capture failed"):
        with writer(tmp_path, overwrite=True) as w:
            w.add(torch.zeros(50, 4))  # three new shards on disk beside the old ones
            assert len(list(tmp_path.glob("shard-*"))) == 3 + 3
            raise RuntimeError("capture failed")
    assert sorted(os.listdir(tmp_path)) == before
    assert torch.equal(ActivationCache(tmp_path).read("a"), rows)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a real writer")
def test_an_overwrite_killed_mid_shard_leaves_the_old_cache(tmp_path):
    rows = old_cache(tmp_path)
    pid = os.fork()
    if pid == 0:  # the child: a writer killed by SIGKILL in the middle of its third shard
        try:
            real_save = cache_writer.save_file
            saved = []

            def save_then_die(tensors, path, metadata=None):
                if len(saved) == 2:
                    with open(path, "wb") as handle:
                        handle.write(b"\x01" * 50)  # half a shard, then the kill
                    os.kill(os.getpid(), signal.SIGKILL)
                real_save(tensors, path, metadata=metadata)
                saved.append(path)

            cache_writer.save_file = save_then_die
            dying = writer(tmp_path, overwrite=True)
            dying.add(torch.zeros(60, 4))
        finally:
            os._exit(3)  # never reached when the kill lands
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    # The killed writer left its lock, two finished shards and a half-written temporary.
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == pid
    strays = set(os.listdir(tmp_path)) - set(listed_files(tmp_path)) - {LOCK_NAME}
    assert len(strays) == 3 and sum(name.endswith(".tmp") for name in strays) == 1
    cache = ActivationCache(tmp_path)  # the old cache, complete and unchanged
    assert torch.equal(cache.read("a"), rows)
    # The next writer takes over the dead writer's lock and clears what it left.
    with writer(tmp_path, overwrite=True) as w:
        w.add(torch.full((20, 4), 7.0))
    assert sorted(os.listdir(tmp_path)) == listed_files(tmp_path)
    assert torch.equal(ActivationCache(tmp_path).read("a"), torch.full((20, 4), 7.0))


# ---------------------------------------------------------------------- the empty cache
def test_closing_without_rows_says_so_and_leaves_no_folder(tmp_path):
    folder = tmp_path / "new" / "cache"
    with pytest.raises(EmptyCacheError, match="no rows were added") as caught:
        with writer(folder):
            pass
    assert str(folder) in str(caught.value) and isinstance(caught.value, ValueError)
    assert not folder.exists()


def test_an_empty_overwrite_keeps_the_old_cache(tmp_path):
    rows = old_cache(tmp_path)
    before = sorted(os.listdir(tmp_path))
    empty = writer(tmp_path, overwrite=True)
    with pytest.raises(EmptyCacheError, match="unchanged"):
        empty.close()
    assert sorted(os.listdir(tmp_path)) == before
    assert torch.equal(ActivationCache(tmp_path).read("a"), rows)
