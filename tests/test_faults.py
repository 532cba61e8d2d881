"""Fault and hostile-input tests (issue 13): each reproduces a failure seen on main and proves it is gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import HUNG_S, KILN, run_kiln, write_recipe


def _model_folder(folder):
    folder.mkdir(parents=True)
    save_file({"model.norm.weight": torch.ones(128)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512,
        "max_position_embeddings": 512}))
    return folder


def test_a_link_out_of_the_model_folder_is_refused(tmp_path):
    """Issue 13.2: chat_template.jinja -> a file outside was read and published."""
    outside = tmp_path / "secret.txt"
    outside.write_text("not for publishing\n")
    model = _model_folder(tmp_path / "model")
    (model / "chat_template.jinja").symlink_to(outside)
    recipe = write_recipe(tmp_path, str(model), {"fp8": {"quant": "fp8"}})
    env = {"KILN_HOME": str(tmp_path / "home")}
    for command in ("check", "plan", "build"):
        result = run_kiln(command, recipe, env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert f"chat_template.jinja links to {outside}, outside the model folder (fix: copy the file" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "cache").exists()


def test_links_inside_the_folder_and_into_a_hub_blob_store_are_fine(tmp_path):
    from kiln.pipeline.data.fetch import refuse_outside_links

    model = _model_folder(tmp_path / "model")
    (model / "tokenizer_config.json").write_text("{}")
    (model / "alias.json").symlink_to(model / "tokenizer_config.json")
    refuse_outside_links(model)
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}")
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(os.path.relpath(repo / "blobs" / "abc123", snapshot))
    refuse_outside_links(snapshot)
    (snapshot / "extra.txt").symlink_to(tmp_path / "hub")   # a folder outside the repo's blob store
    with pytest.raises(Exception, match="extra.txt links to"):
        refuse_outside_links(snapshot)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    """Issue 13.14: two `fp8:` blocks under variants silently kept the last one."""
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("kiln: 1\nname: dup\nmodel: {source: ../m}\n"
                      "calibration: {builtin: python-docs-train}\nevaluation: {builtin: python-docs-heldout}\n"
                      "variants:\n  fp8:\n    quant: fp8\n  fp8:\n    quant: int4_awq\n")
    result = run_kiln("check", recipe)
    assert result.returncode == 2
    assert f"{recipe}:9: variants.fp8: duplicate key; YAML would silently drop the one at line 7" in result.stderr


def _on_small_disk(tmp_path, size: str, script: str) -> subprocess.CompletedProcess:
    """Run `script` (sh) with $DISK a fresh tmpfs of `size`, in a private mount namespace; skip where the
    machine allows no such mount (not root, no unshare)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {disk}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({probe.stderr.strip() or 'unshare failed'})")
    return subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {disk} && {script}"],
                          capture_output=True, text=True, env={**os.environ, "DISK": str(disk)}, timeout=HUNG_S)


@pytest.mark.slow
@pytest.mark.parametrize("size, where", [("2500k", "export"), ("7m", "upload")])
def test_a_full_disk_during_a_build_is_one_line_and_leaves_nothing_partial(tmp_path, test_model, size, where):
    """Issue 13.10: a full disk during export or upload printed a traceback. On a tmpfs that fills up while
    the checkpoint is written (2.5 MB) or while it is uploaded to the embedded registry (7 MB: the cache takes
    4.2 MB, the registry's database and blobs 5.1 MB more; validation no longer writes the baseline's logits)."""
    recipe = write_recipe(tmp_path, str(test_model), {"fp8": {"quant": "fp8"}}, name="full", samples=8, seq_len=64)
    result = _on_small_disk(tmp_path, size, f'KILN_HOME=$DISK/home {KILN} build {recipe}; echo "rc=$?"; '
                                            f'find $DISK -name ".tmp-*"; KILN_HOME=$DISK/home {KILN} ls --json')
    errors = [line for line in result.stderr.splitlines() if line.startswith("kiln: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "space" in errors[0] or "disk is full" in errors[0], errors[0]
    assert "(fix: free space on that disk" in errors[0]
    out = result.stdout.splitlines()
    assert "rc=1" in out, result.stdout
    after = out[out.index("rc=1") + 1:]
    assert not [line for line in after if ".tmp-" in line], "partial folders were left behind"
    assert json.loads("\n".join(after)) == [], "no version may be published from a failed build"


def test_progress_reaches_a_ci_log_at_least_every_interval(monkeypatch, capsys):
    """Issue 13.16: with stderr not a terminal, a 13-minute calibration printed nothing."""
    import time

    from kiln.common.progress import ProgressReporter

    monkeypatch.setenv("KILN_PROGRESS_INTERVAL_S", "0.1")
    with ProgressReporter().task("calibrate fp8", total=4) as task:
        time.sleep(0.35)     # no advance for a while: the heartbeat still prints
        task.advance(3)
        time.sleep(0.25)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "calibrate fp8: started"
    beats = [line for line in lines if " after " in line]
    assert len(beats) >= 4 and beats[0].startswith("calibrate fp8: 0/4 after ")
    assert any(line.startswith("calibrate fp8: 3/4 after ") for line in beats)
    assert lines[-1].startswith("calibrate fp8: 4/4 done in ")


def test_the_next_build_reclaims_what_a_killed_process_left(tmp_path):
    """Issue 13.15: after a kill, temporary folders piled up in /tmp and partial entries stayed a day."""
    from kiln.pipeline.plan.cache import StageCache
    from kiln.common.scratch import owner_token, process_scratch, reclaim_dead

    home = tmp_path / "home"
    code = ("import os, sys, tempfile\n"
            "from pathlib import Path\n"
            "from kiln.common.scratch import owner_token, process_scratch\n"
            "home = Path(sys.argv[1])\n"
            "tempfile.mkdtemp(prefix='kiln-blobs-', dir=process_scratch(home))\n"
            "tempfile.mkdtemp(prefix=f'.tmp-abc-{owner_token()}-', dir=home / 'cache' / 'quantize')\n"
            "os._exit(0)\n")   # no clean-up runs, as after a SIGKILL
    (home / "cache" / "quantize").mkdir(parents=True)
    subprocess.run([sys.executable, "-c", code, str(home)], check=True)
    running = home / "cache" / "quantize" / f".tmp-def-{owner_token()}-x1"   # this live process's partial entry
    running.mkdir()
    # Another host sharing this home (a node of a distributed calibration): its pids mean nothing here.
    pid, start, boot = owner_token().split("-")
    elsewhere = f"{2 ** 22 + 7}-{start}-{'0' if boot[0] != '0' else '1'}{boot[1:]}"
    (home / "cache" / "quantize" / f".tmp-ghi-{elsewhere}-x2").mkdir()
    (home / "tmp" / elsewhere).mkdir()
    assert len(list((home / "tmp").iterdir())) == 2 and len(list((home / "cache" / "quantize").iterdir())) == 3

    assert StageCache(home / "cache").clean_stale_temporaries() == 1
    assert sorted(p.name for p in (home / "cache" / "quantize").iterdir()) == [running.name, f".tmp-ghi-{elsewhere}-x2"]
    mine = process_scratch(home)
    assert reclaim_dead(home) == 1
    assert sorted(p.name for p in (home / "tmp").iterdir()) == sorted([mine.name, elsewhere])


@pytest.mark.slow
def test_sigterm_during_a_build_is_ctrl_c_one_message_and_nothing_partial(tmp_path, test_model):
    """Issue 13.15: SIGTERM printed nothing and left .tmp-* folders."""
    import signal
    import time

    home = tmp_path / "home"
    recipe = write_recipe(tmp_path, str(test_model), {"int4": {"quant": "int4_awq"}}, name="term")
    build = subprocess.Popen([str(KILN), "build", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "KILN_HOME": str(home), "TMPDIR": str(tmp_path / "t")})
    (tmp_path / "t").mkdir()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((home / "cache" / "quantize").glob(".tmp-*/hf")):
        assert build.poll() is None, "the build ended before it could be stopped mid-export"
        time.sleep(0.05)
    build.send_signal(signal.SIGTERM)
    _, stderr = build.communicate(timeout=120)
    assert build.returncode == 143, stderr
    assert "kiln: terminated (SIGTERM); completed cache entries are kept, partial ones discarded" in stderr
    assert "Traceback" not in stderr
    assert list((home / "cache").glob("*/.tmp-*")) == []
    assert list((home / "tmp").iterdir()) == [] and list((tmp_path / "t").iterdir()) == []


def _data(tmp_path, name: str, text: str, **spec):
    from kiln.pipeline.data.documents import resolve_data
    from kiln.pipeline.recipe.schema import DataSpec

    path = tmp_path / name
    if not path.exists():
        path.write_text(text)
    return resolve_data(DataSpec(file=name, **spec), lambda rel: (tmp_path / rel).resolve(), "calibration")


def test_a_huge_calibration_file_is_read_only_as_far_as_needed(tmp_path):
    """Issue 13.13: a 2 GB .txt was read whole (7 GB RSS). Here a 200 MB file of paragraphs: reading what
    4 x 32 tokens need must not touch more than the budget, and must not hold the file in memory."""
    import resource

    path = tmp_path / "big.txt"
    paragraph = ("kiln reads calibration text lazily. " * 20 + "\n\n").encode()
    with path.open("wb") as handle:
        for _ in range(200 * 2**20 // len(paragraph)):
            handle.write(paragraph)
    data = _data(tmp_path, "big.txt", "", samples=4, seq_len=32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    documents = data.documents()
    first = [next(documents) for _ in range(3)]
    assert first[0] == paragraph.decode().strip()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024   # KiB: far below the file
    read = sum(1 for _ in documents) + 3
    assert read * len(paragraph) < 20 * 2**20, "read past the budget (16 Mi characters for this recipe)"


def test_absurd_or_undecodable_data_files_are_one_clear_line(tmp_path):
    from kiln.common.errors import UserInputError

    (tmp_path / "one-line.jsonl").write_text('{"text": "' + "x" * (17 * 2**20) + '"}\n')
    with pytest.raises(UserInputError, match=r"one-line.jsonl: line 1 is longer than the 16777216 characters"):
        list(_data(tmp_path, "one-line.jsonl", "", samples=2, seq_len=8).documents())
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n\nbr\xfbl\xe9e".encode("latin-1"))
    with pytest.raises(UserInputError, match=r"latin1.txt: not UTF-8 text .*\(fix: convert it"):
        list(_data(tmp_path, "latin1.txt", "").documents())


def test_a_txt_link_is_read_as_text_whatever_its_target_is_called(tmp_path):
    """Issue 13.14: calib.txt -> corpus.data was parsed as JSONL, because the target's suffix decided."""
    (tmp_path / "corpus.data").write_text("first paragraph\n\nsecond one\n")
    (tmp_path / "calib.txt").symlink_to(tmp_path / "corpus.data")
    assert list(_data(tmp_path, "calib.txt", "").documents()) == ["first paragraph", "second one"]


def test_check_finds_missing_data_files_and_excludes_that_match_nothing(tmp_path, test_model):
    """Issue 13.14: both passed `kiln check` and failed (or silently quantized everything) at build."""
    recipe = write_recipe(tmp_path, str(test_model), {"fp8": {"quant": "fp8", "exclude": ["lm_head", "*.mlp.down_prj"]}})
    text = recipe.read_text().replace("builtin: python-docs-train", "file: missing.txt")
    recipe.write_text(text)
    result = run_kiln("check", recipe)
    assert result.returncode == 2, result.stderr
    assert f"{recipe}: calibration.file: '{tmp_path / 'missing.txt'}' does not exist (fix:" in result.stderr
    assert (f"{recipe}: variants.fp8.exclude: '*.mlp.down_prj' matches no module of the model, so nothing would be "
            "excluded") in result.stderr
    assert "'lm_head' matches" not in result.stderr


def test_check_reads_data_files_as_build_does(tmp_path, test_model):
    """Issue 24.16: a 2 GB file with no blank line in its first 16 Mi characters passed check; build refused it."""
    recipe = write_recipe(tmp_path, str(test_model), {"fp8": {"quant": "fp8"}})
    recipe.write_text(recipe.read_text().replace("builtin: python-docs-train", "file: flat.txt"))
    with (tmp_path / "flat.txt").open("wb") as handle:
        handle.truncate(64 * 2**20)   # sparse: 64 Mi NUL characters, no paragraph break
    result = run_kiln("check", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"kiln: {recipe}: {tmp_path / 'flat.txt'}: no blank line between paragraphs in "
                                     "the first 16777216 characters kiln reads (fix: split the text into documents, "
                                     "or use a smaller file)")
    (tmp_path / "flat.txt").write_text("a paragraph of calibration text\n\nand another one\n")
    assert run_kiln("check", recipe).returncode == 0


def test_a_recipe_that_is_not_a_small_regular_file_is_refused_without_reading_it(tmp_path):
    """Issue 13.10: `kiln build /dev/zero` died of MemoryError."""
    result = run_kiln("build", "/dev/zero", env={"KILN_HOME": str(tmp_path / "home")})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "kiln: /dev/zero: not a regular file (fix: pass a recipe .yaml file)" in result.stderr
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 2**21)
    result = run_kiln("check", big)
    assert result.returncode == 2 and "a recipe is a short YAML file" in result.stderr
    assert not (tmp_path / "home").exists()


def test_pickle_weights_beside_an_unrelated_safetensors_are_refused(tmp_path):
    """Issue 13.10: a .bin beside a non-model .safetensors passed check and crashed the build."""
    model = _model_folder(tmp_path / "model")
    (model / "model.safetensors").rename(model / "projector.safetensors")
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    recipe = write_recipe(tmp_path, str(model), {"fp8": {"quant": "fp8"}})
    for command in ("check", "build"):
        result = run_kiln(command, recipe, env={"KILN_HOME": str(tmp_path / "home")})
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "has only pickle weights (pytorch_model.bin) (projector.safetensors is not model weights" in result.stderr


def test_an_unknown_family_with_remote_code_is_refused_by_check(tmp_path):
    """Issue 13.10: config.json with an unknown model_type and an auto_map passed check."""
    model = _model_folder(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="weirdo", auto_map={"AutoModelForCausalLM": "modeling_weirdo.WeirdoForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path, str(model), {"fp8": {"quant": "fp8"}})
    for command in ("check", "build"):
        result = run_kiln(command, recipe, env={"KILN_HOME": str(tmp_path / "home")})
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "model_type 'weirdo' is not in kiln's family table" in result.stderr
        assert "(fix: use a model of a family that `kiln families` lists)" in result.stderr


def test_a_read_only_kiln_home_is_one_line_for_every_command(tmp_path, test_model):
    recipe = write_recipe(tmp_path, str(test_model), {"fp8": {"quant": "fp8"}}, name="ro", samples=8, seq_len=64)
    commands = [f"build {recipe}", "pull ro-fp8/1 --out $DISK/out --gpu none", "ls"]
    script = "mkdir $DISK/home && mount -o remount,ro $DISK && " + "; ".join(
        f'KILN_HOME=$DISK/home {KILN} {command}; echo "rc=$?"' for command in commands)
    result = _on_small_disk(tmp_path, "1m", script)
    assert result.stdout.split() == ["rc=1"] * 3, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and "Traceback" not in result.stderr, result.stderr
    assert all("Read-only file system (fix: the disk is read-only; set KILN_HOME" in line for line in lines)


@pytest.mark.slow   # a real ModelOpt calibration of the demo model (10-20 s; make test-fast keeps its 3 minutes)
def test_calibration_progress_counts_each_pass_to_its_total(test_model, monkeypatch, capsys):
    """Issue 24.17: "calibrate int4_awq: 59/32": AWQ's statistics and search passes both counted the samples."""
    from transformers import AutoTokenizer

    from kiln.common.progress import ProgressReporter
    from kiln.pipeline.data.corpus import python_docs
    from kiln.pipeline.data.documents import token_samples
    from kiln.quantize import KVCacheFormat, QuantFormat
    from kiln.quantize import modelopt_adapter as adapter

    monkeypatch.setenv("KILN_PROGRESS_INTERVAL_S", "3600")
    samples = token_samples(python_docs("train"), AutoTokenizer.from_pretrained(test_model), 4, 32)
    model = adapter.load_source_model(test_model, "bfloat16", False, False)
    passes = []
    with ProgressReporter().task("calibrate int4_awq", total=len(samples)) as task:
        def advance(n):
            task.advance(n)
            assert task.completed <= task.total, task.completed   # never 59/32
        adapter.calibrate(model, adapter.modelopt_config(QuantFormat.int4_awq, KVCacheFormat.none, None), samples,
                          advance, 2, on_pass=lambda n: (passes.append(n), task.restart(f"calibrate int4_awq (pass {n})")))
    assert passes and passes == list(range(2, len(passes) + 2))   # AWQ runs the loop more than once
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("calibrate")]   # not ModelOpt's
    assert lines[0] == "calibrate int4_awq: started" and f"calibrate int4_awq (pass {passes[-1]}): started" in lines
    assert lines[-1].startswith(f"calibrate int4_awq (pass {passes[-1]}): 4/4 done in")
