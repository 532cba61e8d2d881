"""The stage cache: pinned keys, atomic entries, damaged entries discarded."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from kiln.pipeline.plan.cache import ENTRY_FILE, StageCache, stage_key
from tests.conftest import KILN, write_recipe

# Changing how keys are computed invalidates every cache: make that a visible diff here.
GOLDEN_KEY = "ad29cd712c4ff53bc66c2ac286270bf947a2a858a83327ba3ee439f39bf4eb37"


def test_golden_key():
    key, material = stage_key(
        "quantize",
        1,
        {"request": {"quant": "fp8", "kv_cache": "fp8", "group_size": None, "dtype": "bfloat16", "tp_size": 1},
         "calibration": {"digest": "ab" * 32, "samples": 32, "seq_len": 256}},
        {"model": "cd" * 32},
        {"nvidia-modelopt": "0.47.0", "torch": "2.13.0+cpu", "transformers": "5.24.0", "kiln": "0.1.0"},
    )
    assert material["stage"] == "quantize"
    assert key == GOLDEN_KEY
    # The key is exactly sha256 of canonical JSON (sorted keys, no whitespace) of the material.
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(canonical.encode()).hexdigest() == key


def test_key_ignores_dict_order_but_not_values():
    a, _ = stage_key("s", 1, {"x": 1, "y": 2}, {}, {})
    b, _ = stage_key("s", 1, {"y": 2, "x": 1}, {}, {})
    c, _ = stage_key("s", 1, {"x": 1, "y": 3}, {}, {})
    d, _ = stage_key("s", 2, {"x": 1, "y": 2}, {}, {})
    assert a == b and len({a, c, d}) == 3


def test_entry_appears_only_when_complete(tmp_path):
    cache = StageCache(tmp_path)
    with pytest.raises(RuntimeError):
        with cache.write("quantize", "k1", {}) as out:
            (out / "weights.bin").write_bytes(b"x" * 10)
            raise RuntimeError("killed halfway")
    assert cache.lookup("quantize", "k1") is None
    assert list((tmp_path / "quantize").iterdir()) == []
    with cache.write("quantize", "k1", {"m": 1}) as out:
        (out / "weights.bin").write_bytes(b"x" * 10)
    entry = cache.lookup("quantize", "k1")
    assert entry is not None and (entry / ENTRY_FILE).is_file()


def test_damaged_entry_is_discarded_with_a_warning(tmp_path):
    warnings = []
    cache = StageCache(tmp_path, warn=warnings.append)
    with cache.write("validate", "k2", {}) as out:
        (out / "report.json").write_text('{"kl": 0.1}')
    (cache.entry_dir("validate", "k2") / "report.json").write_text('{"kl": 0.0}')  # same size, other bytes
    assert cache.lookup("validate", "k2") is None
    assert "altered" in warnings[0] and not cache.entry_dir("validate", "k2").exists()


@pytest.mark.slow   # a real build killed mid-calibration, then rebuilt: end to end (about 20 s; make test-fast keeps its 3 minutes)
def test_killed_build_leaves_no_entry_that_looks_complete(tmp_path, test_model, kiln_home):
    recipe = write_recipe(tmp_path, str(test_model), variants={"int4": {"quant": "int4_awq"}})
    build = subprocess.Popen([str(KILN), "build", str(recipe)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "KILN_HOME": str(kiln_home)})
    quantize_dir = kiln_home / "cache" / "quantize"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(quantize_dir.glob(".tmp-*/hf")):
        if build.poll() is not None:
            pytest.fail("the build ended before it could be killed mid-export")
        time.sleep(0.05)
    build.send_signal(signal.SIGKILL)
    build.wait()
    leftovers = list(quantize_dir.iterdir())
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers), leftovers
    cache = StageCache(kiln_home / "cache")
    assert all(not cache.intact("quantize", p.name) for p in leftovers)
    from tests.conftest import run_kiln

    plan = run_kiln("plan", recipe, "--json")
    assert plan.returncode == 0, plan.stderr
    import json

    statuses = {(s["stage"], s["target"]): s["status"] for s in json.loads(plan.stdout)["stages"]}
    assert statuses[("quantize", "int4")] == "will run"
