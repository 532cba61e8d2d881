"""The blob store on the embedded registry: files stored once by sha256, and one SM added by two hosts at once."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from kiln.common.digest import file_sha256
from kiln.common.progress import SILENT
from kiln.registry import PUBLISH_KEY_TAG, add_sm, publish, pull
from kiln.registry.tags import gate_tags


def files_in(folder: Path, contents: dict[str, bytes]) -> dict[str, Path]:
    found = {}
    for rel, data in contents.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        found[rel] = path
    return found


def test_a_second_version_sends_only_the_files_the_store_lacks(kiln_home, tmp_path):
    shared = os.urandom(64 * 1024)
    first = publish(kiln_home, "m", files_in(tmp_path / "a", {"hf/tokenizer.json": shared, "hf/w.bin": b"one"}),
                    {PUBLISH_KEY_TAG: "a"}, [], SILENT)
    assert (first.transfer.files, first.transfer.reused_files) == (2, 0)
    second = publish(kiln_home, "m", files_in(tmp_path / "b", {"hf/tokenizer.json": shared, "hf/w.bin": b"two"}),
                     {PUBLISH_KEY_TAG: "b"}, [], SILENT)
    assert (second.version, second.transfer.files, second.transfer.bytes) == ("2", 1, 3)
    assert (second.transfer.reused_files, second.transfer.reused_bytes) == (1, len(shared))
    blobs = sorted(p.name for p in (kiln_home / "registry" / "artifacts" / "blobs").rglob("*") if p.is_file())
    assert len(blobs) == 3
    pulled = pull(kiln_home, "m/2", tmp_path / "pulled", SILENT)
    assert (tmp_path / "pulled" / "hf" / "w.bin").read_bytes() == b"two" and pulled.files == 2


def test_two_hosts_adding_the_same_sm_at_once_leave_a_pullable_version(kiln_home, tmp_path):
    """TensorRT engines are not bit-reproducible: two builds of one SM differ. Whichever wins, the
    version's tag, manifest and blobs must agree."""
    checkpoint = files_in(tmp_path / "ckpt", {"trtllm/config.json": b"{}", "trtllm/rank0.safetensors": b"w"})
    version = publish(kiln_home, "e", checkpoint, {PUBLISH_KEY_TAG: "ckpt"}, [], SILENT)
    record = {"inputs": {rel: file_sha256(path) for rel, path in checkpoint.items()}}
    engines = {}
    for host in ("a", "b"):
        engines[host] = os.urandom(4096)
        engines[host + "-files"] = files_in(tmp_path / host, {"engines/sm90/rank0.engine": engines[host],
                                                              "engines/sm90/engine.json": json.dumps(record).encode()})
    start = threading.Barrier(2)

    def add(host):
        start.wait()
        add_sm(kiln_home, version, "sm90", engines[host + "-files"], gate_tags(True, [], "sm90"), f"key-{host}", record, SILENT)

    threads = [threading.Thread(target=add, args=(host,)) for host in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pull(kiln_home, "e/1", tmp_path / "pulled", SILENT, sm="sm90")   # verifies against the winning manifest
    assert (tmp_path / "pulled" / "engines" / "sm90" / "rank0.engine").read_bytes() in (engines["a"], engines["b"])


def test_a_corrupt_stored_blob_is_repaired_not_reused(kiln_home, tmp_path):
    """Issue 13.1: one flipped byte in a stored blob; the next version reused it by name and could not be pulled."""
    shared = os.urandom(64 * 1024)
    publish(kiln_home, "m", files_in(tmp_path / "a", {"hf/tokenizer.json": shared, "hf/w.bin": b"one"}),
            {PUBLISH_KEY_TAG: "a"}, [], SILENT)
    sha = file_sha256(tmp_path / "a" / "hf" / "tokenizer.json")
    (stored,) = (kiln_home / "registry" / "artifacts" / "blobs").rglob(sha)
    damaged = bytearray(stored.read_bytes())
    damaged[100] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    second = publish(kiln_home, "m", files_in(tmp_path / "b", {"hf/tokenizer.json": shared, "hf/w.bin": b"two"}),
                     {PUBLISH_KEY_TAG: "b"}, [], SILENT)
    assert (second.transfer.repaired_files, second.transfer.reused_files, second.transfer.files) == (1, 0, 2)
    assert file_sha256(stored) == sha
    for ref in ("m/2", "m/1"):   # the repair heals the older version too
        pull(kiln_home, ref, tmp_path / ref.replace("/", "-"), SILENT)
    assert (tmp_path / "m-2" / "hf" / "tokenizer.json").read_bytes() == shared
