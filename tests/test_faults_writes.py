"""Writes that never land outside their target (issue 24.1-3, 14): devices, links, two writers of one --out,
URI characters in KILN_HOME, relative paths handed to a container. Each test failed on main before its fix."""

from __future__ import annotations

import os
import socket
import stat
import threading

import pytest

from kiln.common.errors import KilnError, UserInputError
from kiln.common.fsutil import atomic_dir, atomic_write_text
from tests.conftest import run_kiln, write_recipe
from tests.test_faults_registry import _publish


def test_a_link_is_followed_to_the_file_it_names_and_stays_a_link(tmp_path):
    target = tmp_path / "real.html"
    target.write_text("old")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.html", "real.html"]   # no temporary left


def test_a_pipe_is_written_through_and_stays_a_pipe(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    atomic_write_text(fifo, "streamed")
    reader.join(timeout=10)
    assert received == ["streamed"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_pipe_nobody_reads_is_refused_after_a_bounded_wait(tmp_path, monkeypatch):
    """Issue 36.6: `kiln report --out FIFO` with no reader blocked forever on 9edec45 (a blocking open)."""
    import time

    from kiln.common import fsutil

    monkeypatch.setattr(fsutil, "FIFO_READER_WAIT_S", 1.0)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(UserInputError, match=r"fifo: is a FIFO that nobody read within 1 s \(fix: start its reader"):
        atomic_write_text(fifo, "lost")
    assert time.monotonic() - started < 5 and stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node takes root (CI containers run as root)")
def test_a_device_node_is_written_through_never_replaced(tmp_path):
    """Issue 24.1: `kiln report --out /dev/null`, as root, replaced the device node with a regular file."""
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))   # what /dev/null is, in a folder of the test's own
    atomic_write_text(null, "x" * 10_000)
    mode = os.lstat(null).st_mode
    assert stat.S_ISCHR(mode) and os.major(os.lstat(null).st_rdev) == 1
    full = tmp_path / "full"
    os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))   # /dev/full: every write fails
    with pytest.raises(OSError) as failed:
        atomic_write_text(full, "x")
    assert failed.value.errno == 28 and stat.S_ISCHR(os.lstat(full).st_mode)


def test_a_socket_or_a_dangling_link_is_refused(tmp_path):
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock"))
        with pytest.raises(UserInputError, match=r"sock: is a socket, not a regular file; kiln replaces files"):
            atomic_write_text(tmp_path / "sock", "x")
        assert stat.S_ISSOCK(os.lstat(tmp_path / "sock").st_mode)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    with pytest.raises(UserInputError, match="is a link to nothing"):
        atomic_write_text(tmp_path / "dangling", "x")
    assert not (tmp_path / "nowhere").exists()


def test_two_writers_of_one_out_folder_never_both_succeed(tmp_path):
    """Issue 24.2: two pulls into one new --out both said "all verified"; the folder held one model's files."""
    out = tmp_path / "out"
    with pytest.raises(KilnError, match="another writer put files there while this one ran"):
        with atomic_dir(out, shared=False) as second:
            with atomic_dir(out, shared=False) as first:
                (first / "model").write_text("fp8")
            (second / "model").write_text("int4-awq")
    assert (out / "model").read_text() == "fp8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]    # the loser's folder is gone
    with atomic_dir(out, shared=True) as same:                      # a cache entry: the same content, kept
        (same / "model").write_text("fp8")
    assert (out / "model").read_text() == "fp8"


def test_pull_onto_a_link_to_an_empty_folder_fills_that_folder(kiln_home, tmp_path):
    """Issue 24.2: pull printed "12 files, all verified", exit 0, and the linked folder stayed empty."""
    _publish(kiln_home, "m-v", b"weights", "k1")
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    result = run_kiln("pull", "m-v/1", "--out", link, "--gpu", "none", env={"KILN_HOME": str(kiln_home)})
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and (target / "hf" / "w.bin").read_bytes() == b"weights"
    assert sorted(p.name for p in target.iterdir()) == ["hf", "manifest.json"]


@pytest.mark.parametrize("special", ["?", "#", "%"])
def test_a_kiln_home_with_uri_characters_is_refused_and_nothing_is_written(tmp_path, special):
    """Issue 24.3: with `?` kiln ls wrote a 954 KB database outside KILN_HOME; with `#` a build created a file."""
    root = tmp_path / "root"
    root.mkdir()
    recipe = write_recipe(tmp_path, str(tmp_path / "no-model"), {"fp8": {"quant": "fp8"}})
    home = root / f"a{special}b"
    for command in (("ls",), ("build", recipe), ("pull", "m/1", "--out", tmp_path / "out"), ("report", recipe)):
        result = run_kiln(*command, env={"KILN_HOME": str(home)})
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.strip() == (f"kiln: KILN_HOME={home}: holds {special!r}, which the registry's URI would "
                                          "read as a query, fragment or escape and so write outside the home; nothing "
                                          "was written (fix: choose a path without ?, # or %)")
        assert list(root.iterdir()) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", ["one long name", "a deep path"])
def test_a_kiln_home_longer_than_the_system_allows_is_one_line(tmp_path, shape):
    """Issue 36.6: `ls`, `plan` and `registry verify` gave an OSError traceback (File name too long)."""
    home = tmp_path / ("a" * 300) if shape == "one long name" else tmp_path.joinpath(*["b" * 200] * 19)
    recipe = write_recipe(tmp_path, "/nonexistent/model", {"fp8": {"quant": "fp8"}})
    for command in (("ls",), ("plan", recipe), ("registry", "verify")):
        result = run_kiln(*command, env={"KILN_HOME": str(home)})
        assert result.returncode == 2 and "Traceback" not in result.stderr, (command, result.stderr[-500:])
        [line] = result.stderr.strip().splitlines()
        assert "longer than this system allows for the files kiln keeps in it" in line and \
            "(fix: choose a shorter path)" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.yaml"]
