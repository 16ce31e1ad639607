"""Faults of the files a run keeps: unreadable cache entries, a full disk."""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import torch

from qsfm_cli.cache import Cache
from qsfm_cli.files import atomic_write

TORCH_FULL_DISK = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                   "file write failed")


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b"", lambda b: b"not a zip archive"])
def test_an_unreadable_cache_entry_is_recomputed_and_replaced(tmp_path, caplog, damage):
    cache = Cache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"sums": torch.arange(1000.0)}

    value, hit = cache.get_or_compute("stats", "k", compute)
    entry = cache.path("stats", "k")
    entry.write_bytes(damage(entry.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="qsfm_cli.cache"):
        again, hit = cache.get_or_compute("stats", "k", compute)
    assert not hit and len(calls) == 2 and torch.equal(again["sums"], value["sums"])
    assert f"cache entry {entry} cannot be read" in caplog.text
    third, hit = cache.get_or_compute("stats", "k", compute)          # the entry was replaced
    assert hit and len(calls) == 2 and torch.equal(third["sums"], value["sums"])


def raise_oserror(f):
    f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def raise_torch_error(f):
    f.write(b"partial")
    raise RuntimeError(TORCH_FULL_DISK)


def torch_save_to_full_device(f):
    torch.save({"w": torch.zeros(10_000)}, "/dev/full")


def write_to_full_device(f):
    with open("/dev/full", "wb") as full:
        full.write(b"x" * 100_000)


@pytest.mark.parametrize("write", [raise_oserror, raise_torch_error, torch_save_to_full_device, write_to_full_device])
def test_a_full_disk_is_named_and_leaves_nothing_behind(tmp_path, write):
    if write in (torch_save_to_full_device, write_to_full_device) and not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    path = tmp_path / "runs" / "pruned_model.pt"
    with pytest.raises(OSError, match=f"no space left on {path}$") as info:
        atomic_write(path, write)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(path.parent) == []


@pytest.mark.parametrize("error", [ValueError("not serializable"), PermissionError(errno.EACCES, "denied"),
                                   RuntimeError("unrelated")])
def test_other_write_errors_pass_through(tmp_path, error):
    def fail(f):
        raise error

    with pytest.raises(type(error)) as info:
        atomic_write(tmp_path / "x.json", fail)
    assert info.value is error
    assert os.listdir(tmp_path) == []
