"""`kiln cache ls` and `kiln cache prune` (issue 37.7): entries by stage with size, last use and the versions that
need them; pruning by age and size that never takes what a running build holds or what a published version needs
(unless asked), and that leaves the cache consistent when it is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kiln.pipeline.plan.cache import HOLDS, StageCache, held_keys
from kiln.pipeline.plan.cache_entries import PruneRules, cache_entries, choose, mark_references
from tests.conftest import KILN, run_kiln, write_recipe


def _entry(cache: StageCache, stage: str, key: str, size: int = 10, inputs: dict | None = None,
           published: tuple[str, str] | None = None, files: int = 1, used: float | None = None) -> Path:
    with cache.write(stage, key, {"stage": stage, "input_digests": inputs or {}}) as out:
        for i in range(files):
            (out / f"f{i}.bin").write_bytes(b"x" * size)
        if published:
            (out / "published.json").write_text(json.dumps({"name": published[0], "version": published[1]}))
    entry = cache.entry_dir(stage, key)
    if used is not None:
        os.utime(entry, (used, used))
    return entry


def test_references_follow_inputs_and_prune_keeps_what_is_needed_or_held(tmp_path):
    cache = StageCache(tmp_path / "cache")
    now = time.time()
    _entry(cache, "quantize", "q1", size=1000, used=now - 5 * 86400)
    _entry(cache, "size", "q1", used=now - 5 * 86400)
    _entry(cache, "validate", "v1", inputs={"checkpoint": "q1", "model": "not-an-entry"}, used=now - 5 * 86400)
    _entry(cache, "publish", "p1", inputs={"checkpoint": "q1", "report": "v1"}, published=("t-fp8", "1"),
           used=now - 5 * 86400)
    _entry(cache, "quantize", "q2", size=3000, used=now - 3 * 86400)   # nothing published from it
    _entry(cache, "quantize", "q3", size=2000, used=now - 1 * 86400)
    _entry(cache, "publish", "p9", inputs={"checkpoint": "q3"}, published=("gone", "4"), used=now)   # deleted version
    foreign = cache.root / "quantize" / "not-an-entry"   # a folder with a JSON that is no entry record
    foreign.mkdir()
    (foreign / "kiln-entry.json").write_text('["a list"]')
    entries = cache_entries(cache.root)
    assert "not-an-entry" not in {e.key for e in entries}
    mark_references(entries, {("t-fp8", "1"): "t"})
    needed = {(e.stage, e.key): (sorted(e.versions), sorted(e.recipes)) for e in entries if e.versions}
    assert needed == {(s, k): ([("t-fp8", "1")], ["t"]) for s, k in
                      [("quantize", "q1"), ("size", "q1"), ("validate", "v1"), ("publish", "p1")]}
    assert {e.key: e.size for e in entries}["q2"] == 3000

    def chosen(rules, held=frozenset()):
        return [(e.stage, e.key) for e in choose(entries, rules, set(held), now)]

    assert chosen(PruneRules(older_than_s=2 * 86400)) == [("quantize", "q2")]
    assert chosen(PruneRules(older_than_s=2 * 86400), held={"q2"}) == []
    assert chosen(PruneRules(older_than_s=2 * 86400, keep_referenced=False)) == [
        ("publish", "p1"), ("quantize", "q1"), ("size", "q1"), ("validate", "v1"), ("quantize", "q2")]
    # Least recently used first until the rest fits: q2 (3000) goes, then q3 (2000); p9 is newest and small.
    total = sum(e.size for e in entries)
    assert chosen(PruneRules(max_size=total - 4000)) == [("quantize", "q2"), ("quantize", "q3")]
    assert chosen(PruneRules(max_size=total)) == []


def test_prune_never_removes_a_held_entry_and_a_dead_builds_hold_lapses(tmp_path):
    cache = StageCache(tmp_path / "cache")
    for key in ("a", "b"):
        _entry(cache, "quantize", key, used=time.time() - 86400)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from kiln.pipeline.plan.cache import StageCache
        with StageCache({str(cache.root)!r}).hold(["a"]):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert held_keys(cache.root) == {"a"}
        result = run_kiln("cache", "prune", "--older-than", "1h", "--json",
                          env={"KILN_HOME": str(tmp_path)})
        assert result.returncode == 0, result.stderr
        assert [e["key"] for e in json.loads(result.stdout)["removed"]] == ["b"]
        assert cache.lookup("quantize", "a") is not None and not cache.entry_dir("quantize", "b").exists()
    finally:
        holder.kill()
        holder.wait()
    assert held_keys(cache.root) == set() and not list((cache.root / HOLDS).glob("*.json"))   # killed: lapsed


def test_a_prune_killed_mid_removal_leaves_no_half_entry(tmp_path):
    """SIGKILL while the entry's files are being deleted: the entry is gone whole (renamed away first), nothing
    lists or looks up the remains, and the next build's clean-up removes them."""
    cache = StageCache(tmp_path / "cache")
    entry = _entry(cache, "quantize", "k" * 64, files=400, used=time.time() - 86400)
    pruner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        real = os.unlink
        def slow(*args, **kwargs):   # each file takes a while, so the kill lands mid-removal
            time.sleep(0.01)
            return real(*args, **kwargs)
        os.unlink = slow
        from kiln.pipeline.plan.cache import StageCache
        from kiln.pipeline.plan.cache_entries import cache_entries, remove_entry
        cache = StageCache({str(cache.root)!r})
        remove_entry(cache, cache_entries(cache.root)[0])
        """)])
    tombstones = lambda: list((cache.root / "quantize").glob(".tmp-prune-*"))   # noqa: E731
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (tombstones() and len(list(tombstones()[0].iterdir())) < 390):
        assert pruner.poll() is None, "the prune ended before it could be killed"
        time.sleep(0.01)
    pruner.send_signal(signal.SIGKILL)
    pruner.wait()
    [left] = tombstones()
    assert 0 < len(list(left.iterdir())) < 400   # killed mid-removal
    assert not entry.exists() and cache.lookup("quantize", "k" * 64) is None
    assert cache_entries(cache.root) == []
    ls = run_kiln("cache", "ls", "--json", env={"KILN_HOME": str(tmp_path)})
    assert ls.returncode == 0 and json.loads(ls.stdout) == [], ls.stderr
    assert cache.clean_stale_temporaries() == 1 and not tombstones()


def test_bad_prune_flags_are_one_line_and_exit_2(tmp_path):
    for args, field in ((["--older-than", "3x"], "--older-than"), (["--max-size", "lots"], "--max-size"), ([], "fix")):
        result = run_kiln("cache", "prune", *args, env={"KILN_HOME": str(tmp_path)})
        assert result.returncode == 2 and field in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_prune_beside_a_running_build(tmp_path, test_model):
    """A real build writes while prune removes everything it may (--include-referenced, age 0): the build's held
    entries stay, its own writes land, it publishes and its version pulls verified; the first build's entries go."""
    home = {"KILN_HOME": str(tmp_path / "home")}
    first = write_recipe(tmp_path, str(test_model), {"fp8": {"quant": "fp8"}}, name="first", samples=4, seq_len=64)
    assert run_kiln("build", first, env=home).returncode == 0
    before = {(e["stage"], e["key"]) for e in json.loads(run_kiln("cache", "ls", "--json", env=home).stdout)}
    assert len(before) >= 4

    second = write_recipe(tmp_path, str(test_model), {"int8": {"quant": "int8_wo"}}, name="second", samples=4,
                          seq_len=64)
    build = subprocess.Popen([str(KILN), "build", str(second), "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, **home})
    holds = tmp_path / "home" / "cache" / HOLDS
    removed: set[tuple[str, str]] = set()   # by prunes that ran wholly while the build held its keys
    while build.poll() is None:
        held = set(holds.glob("*.json"))
        if held:
            pruned = run_kiln("cache", "prune", "--older-than", "0s", "--include-referenced", "--json", env=home)
            assert pruned.returncode == 0, pruned.stderr
            if set(holds.glob("*.json")) == held:
                removed |= {(e["stage"], e["key"]) for e in json.loads(pruned.stdout)["removed"]}
        time.sleep(0.2)
    out, err = build.communicate()
    assert build.returncode == 0, err[-3000:]
    published = json.loads(out)["variants"][0]["registry"]
    assert removed and removed <= before   # while it ran, only the first build's entries went
    pulled = run_kiln("pull", f"{published['name']}/{published['version']}", "--out", tmp_path / "pulled", env=home)
    assert pulled.returncode == 0, pulled.stderr
    for entry in json.loads(run_kiln("cache", "ls", "--json", env=home).stdout):   # what is listed is intact
        assert StageCache(tmp_path / "home" / "cache").intact(entry["stage"], entry["key"])
