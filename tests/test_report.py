"""Results people can look at (issue 16): bits per weight, MLflow-native run records, the accuracy-against-size
figure and `kiln report`, on a real embedded MLflow registry. The browser check and the team server's REST
API are in test_end_to_end.py and test_team_registry.py, on real builds."""

from __future__ import annotations

import base64
import io
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from kiln.common.digest import file_sha256
from kiln.common.progress import SILENT
from kiln.pipeline.report.figures import SizePoint, accuracy_size_figure, accuracy_size_png, figure_digest
from kiln.quantize import checkpoint_size
from kiln.registry import (
    add_runtime_check, add_sm, checkpoint_records, client, ensure_records, prefixed_metrics, publish, recorded_tags,
)
from kiln.registry.tags import RUN_RECORDS, checkpoint_tags, engine_tags, runtime_check_tags
from tests.conftest import run_kiln, write_recipe

FAIL_RED = (198, 40, 40)
FAIL_HEX = "#c62828"


def test_bits_per_weight_counts_the_decoder_linears_and_their_scales(tmp_path):
    source, exported = tmp_path / "source", tmp_path / "hf"
    source.mkdir(), exported.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(1000, 256, dtype=torch.bfloat16),
               "model.layers.0.mlp.up_proj.weight": torch.zeros(512, 256, dtype=torch.bfloat16),
               "model.layers.0.input_layernorm.weight": torch.zeros(256, dtype=torch.bfloat16)},
              source / "model.safetensors")
    # int4 codes two per byte, one bf16 scale per 128 inputs; the embedding stays bf16 and is not counted.
    save_file({"model.embed_tokens.weight": torch.zeros(1000, 256, dtype=torch.bfloat16),
               "model.layers.0.mlp.up_proj.weight": torch.zeros(512, 128, dtype=torch.uint8),
               "model.layers.0.mlp.up_proj.weight_scale": torch.zeros(512, 2, dtype=torch.bfloat16)},
              exported / "model.safetensors")
    size = checkpoint_size(exported, source)
    assert size.linear_weights == 512 * 256
    assert size.bits_per_weight == pytest.approx(4 + 16 / 128)
    assert size.checkpoint_bytes == (exported / "model.safetensors").stat().st_size
    assert checkpoint_size(source, source).bits_per_weight == 16.0


def _pixels(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def _red_pixels(image: Image.Image) -> int:
    return sum(1 for pixel in image.getdata() if all(abs(a - b) < 30 for a, b in zip(pixel, FAIL_RED)))


def _drawn(points: list[SizePoint]):
    """The saved PNG, its axes (laid out as saved) and each drawn variant's marker colour."""
    figure, axes, colours = accuracy_size_figure("t", points)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return _pixels(buffer.getvalue()), axes, colours


def _colour_at(image, axes, colour: str, bits: float, kl: float) -> bool:
    """Is `colour` within two pixels of where (bits, kl) falls on the saved image?"""
    from matplotlib.colors import to_rgb

    want = tuple(round(255 * c) for c in to_rgb(colour))
    x, y = axes.transData.transform((bits, max(kl, axes.get_ylim()[0])))
    column, row = round(x), image.size[1] - round(y)
    near = [image.getpixel((column + dx, row + dy)) for dx in range(-2, 3) for dy in range(-2, 3)]
    return any(all(abs(a - b) < 40 for a, b in zip(pixel, want)) for pixel in near)


def test_the_figure_draws_every_variant_where_its_size_and_kl_are_and_marks_the_failed_one_red():
    passing = [SizePoint("fp8", "fp8 + kv fp8", 8.0, 7e-4, True, 0.01),
               SizePoint("int4-awq", "int4_awq", 4.29, 2e-3, True, 0.05)]
    failing = passing + [SizePoint("nvfp4", "nvfp4", 4.5, 8e-2, False, 0.05)]
    clean, marked = _pixels(accuracy_size_png("t", passing)), _pixels(accuracy_size_png("t", failing))
    assert clean.size == marked.size and clean.size[0] >= 900 and clean.size[1] >= 450
    image, axes, colours = _drawn(failing)
    assert colours["nvfp4"] == FAIL_HEX and len({colours["fp8"], colours["int4-awq"], FAIL_HEX}) == 3
    for point in failing:   # each marker in its colour where its size and KL fall, and not where they do not
        assert _colour_at(image, axes, colours[point.variant], point.bits_per_weight, point.mean_kl), point
        assert not _colour_at(image, axes, colours[point.variant], 12.0, point.mean_kl), point
        assert not _colour_at(image, axes, colours[point.variant], point.bits_per_weight, point.mean_kl * 30), point
    assert _red_pixels(clean) == 0 and _red_pixels(marked) > 80  # the cross and its legend entry
    assert figure_digest("t", passing) != figure_digest("t", failing)
    assert figure_digest("t", passing) == figure_digest("t", list(passing))


def test_dollar_signs_in_names_and_titles_are_drawn_as_written():
    """Issue 24.11: a `$` in a model path or variant made matplotlib parse math and fail every rebuild."""
    from kiln.pipeline.report.figures import kl_history_png

    points = [SizePoint("a$b", "fp8 $x", 8.0, 7e-4, True, 0.01), SizePoint("c$", "int4", 4.3, None, True, 0.01)]
    figure, axes, _ = accuracy_size_figure("/models/$HOME/m$1 $x^{2}$", points)
    assert axes.get_title(loc="left") == r"/models/\$HOME/m\$1 \$x^{2}\$"
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert r"a\$b (fp8 \$x): 8.00 bits" in labels[0] and labels[-1].endswith(r"c\$")
    assert accuracy_size_png("$", points).startswith(b"\x89PNG")
    assert kl_history_png("$t$ $", {"a$b": [(1, 1e-3)], "$": [(2, 2e-3)]}).startswith(b"\x89PNG")


def _version(kiln_home, tmp_path, variant: str, key: str, kl: float, passed: bool, records: bool = True):
    weights = tmp_path / f"{key}.bin"
    weights.write_bytes(key.encode())
    metrics = {"ppl_increase_pct": 0.4, "mean_kl": kl, "top1_agreement": 0.96, "baseline_ppl": 150.0,
               "quantized_ppl": 150.6, "tokens": 8160}
    size = {"bits_per_weight": 8.0021 if variant == "fp8" else 4.2917, "checkpoint_bytes": 2044560}
    quant = "fp8" if variant == "fp8" else "int4_awq"
    tags = checkpoint_tags(
        publish_key=key, recipe="r", recipe_digest="d" * 64, variant=variant, source="local:abc", revision="abc",
        quant=quant, kv_cache="none", algorithm="max", export_quant_algo=quant.upper(), group_size="",
        metrics={**metrics, **size}, tools={"nvidia-modelopt": "0.47.0"}, passed=passed,
        failures=[] if passed else [f"mean KL {kl} > 0.01"],
        runtimes={"vllm": "yes (vLLM 0.32.0, source: x.py)", "sglang": "no (SGLang 0.5, source: y.py)"})
    run_records = checkpoint_records(
        metrics={**metrics, "nan_metric": float("nan")}, size=size, recipe="r", recipe_digest="d" * 64,
        variant=variant, quant=quant, kv_cache="none", backend="modelopt", group_size=None, algorithm="max",
        calibration_samples=32, calibration_seq_len=256, tools={"nvidia-modelopt": "0.47.0", "torch": "2.13.0"})
    published = publish(kiln_home, f"r-{variant}", {"hf/w.bin": weights}, tags, ["candidate"] if passed else [],
                        SILENT, records=run_records if records else None)
    return published, weights, run_records, tags


def _add_sm90(kiln_home, tmp_path, version, weights, records: bool = False) -> None:
    """sm90 engines (KL 9e-4, built in 41.5 s) added to `version`, with or without their run records."""
    engine = tmp_path / "engine.bin"
    engine.write_bytes(b"engine")
    sm_metrics = {"mean_kl": 9e-4, "build_seconds": 41.5}
    add_sm(kiln_home, version, "sm90", {"engines/sm90/rank0.engine": engine},
           engine_tags("sm90", target="trtllm-engine", tensorrt="10.14.1", tensorrt_llm="1.2.0", gpu="H100",
                       metrics=sm_metrics, passed=True, failures=[]),
           "p-sm90", {"inputs": {"hf/w.bin": file_sha256(weights)}}, SILENT,
           records=prefixed_metrics("sm90", sm_metrics) if records else None)


def test_run_records_are_logged_once_and_given_to_older_versions(kiln_home, tmp_path):
    first, weights, records, tags = _version(kiln_home, tmp_path, "fp8", "k1", 7e-4, True)
    mlflow = client(kiln_home)
    run = mlflow.get_run(first.run_id).data
    assert run.metrics["mean_kl"] == 7e-4 and run.metrics["bits_per_weight"] == 8.0021
    assert run.metrics["checkpoint_bytes"] == 2044560 and "nan_metric" not in run.metrics
    assert run.params["format"] == "fp8" and run.params["group_size"] == "none"
    assert run.params["calibration_samples"] == "32" and run.params["tool/torch"] == "2.13.0"
    assert mlflow.get_model_version("r-fp8", first.version).tags[RUN_RECORDS] == recorded_tags()[RUN_RECORDS]
    assert mlflow.get_run(first.run_id).info.run_name == f"r-fp8/{first.version}"

    # A republish finds the version and logs nothing twice.
    again = publish(kiln_home, "r-fp8", {"hf/w.bin": weights}, tags, ["candidate"], SILENT, records=records)
    assert (again.version, again.created) == (first.version, False)
    assert len(mlflow.get_metric_history(first.run_id, "mean_kl")) == 1

    # A version an older kiln published (no records) gets them, and its missing tags, on the next build.
    old, _, records, tags = _version(kiln_home, tmp_path, "fp8", "k2", 6e-4, True, records=False)
    assert mlflow.get_run(old.run_id).data.metrics == {}
    assert ensure_records(kiln_home, old, records, {**tags, "kiln.extra": "x"}) is True
    assert mlflow.get_run(old.run_id).data.metrics["mean_kl"] == 6e-4
    assert mlflow.get_model_version("r-fp8", old.version).tags["kiln.extra"] == "x"
    assert ensure_records(kiln_home, old, records, tags) is False

    # An SM's engines and a runtime check add their metrics under their own prefix.
    _add_sm90(kiln_home, tmp_path, first, weights, records=True)
    add_runtime_check(kiln_home, first, "vllm", runtime_check_tags(
        "vllm", version="0.32.0", device="cpu", metrics={"mean_kl": 8e-4}, greedy_agreement=0.75, passed=True,
        failures=[]), "p-vllm", records=prefixed_metrics("vllm", {"mean_kl": 8e-4, "greedy_agreement": 0.75}))
    metrics = mlflow.get_run(first.run_id).data.metrics
    assert (metrics["sm90/mean_kl"], metrics["sm90/build_seconds"]) == (9e-4, 41.5)
    assert (metrics["vllm/mean_kl"], metrics["vllm/greedy_agreement"]) == (8e-4, 0.75)


@pytest.mark.slow   # a build, four versions and the page's own render: end to end (about 20 s; make test-fast keeps its 3 minutes)
def test_kiln_report_writes_one_self_contained_page(kiln_home, tmp_path, test_model):
    env = {"KILN_HOME": str(kiln_home)}
    variants = {"fp8": {"quant": "fp8", "gates": {"max_kl": 0.01}},
                "int4-awq": {"quant": "int4_awq", "gates": {"max_kl": 0.001}},
                "nvfp4": {"quant": "nvfp4"}}
    recipe = write_recipe(tmp_path, str(test_model), variants, name="r")
    out = tmp_path / "out" / "report.html"

    refused = run_kiln("report", recipe, "--out", out, env=env)
    assert refused.returncode == 2 and "holds no version of recipe 'r'" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not out.exists()

    first, weights, *_ = _version(kiln_home, tmp_path, "fp8", "k1", 7e-4, True)
    _version(kiln_home, tmp_path, "fp8", "k2", 6e-4, True)
    _version(kiln_home, tmp_path, "int4-awq", "k3", 2e-3, False)
    _add_sm90(kiln_home, tmp_path, first, weights)

    written = run_kiln("report", recipe, "--out", out, env=env)
    assert written.returncode == 0, written.stderr
    assert written.stdout.strip() == str(out.resolve())
    page = out.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)          # nothing fetched from the network
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    for data in images:
        image = _pixels(base64.b64decode(data))
        assert image.size[0] >= 700 and len(set(image.getdata())) > 50
    assert _red_pixels(_pixels(base64.b64decode(images[0]))) > 80           # int4-awq failed its KL gate
    for text in ("r-fp8/1", "r-fp8/2", "r-int4-awq/1", "mean KL 0.002 &gt; 0.01", "not published: nvfp4",
                 "H100", "41.5", "10.14.1 / 1.2.0"):
        assert text in page, text
    assert page.count('<td class="pass" title="yes (vLLM 0.32.0') == 2   # the runtime table, per variant

    assert run_kiln("report", recipe, "--out", tmp_path, env=env).returncode == 2   # a folder is not a file
    unwritable = run_kiln("report", recipe, "--out", "/proc/report.html", env=env)
    assert unwritable.returncode == 2 and "--out /proc/report.html: cannot write there" in unwritable.stderr
    assert "Traceback" not in unwritable.stderr
    # Issue 24.1: a pipe is streamed to, a link is followed; neither is replaced by a regular file.
    streamed = run_kiln("report", recipe, "--out", "/dev/stdout", env=env)
    assert streamed.returncode == 0 and streamed.stdout.startswith("<!doctype html>")
    link = tmp_path / "latest.html"
    link.symlink_to(out)
    out.write_text("old")
    assert run_kiln("report", recipe, "--out", link, env=env).returncode == 0
    assert link.is_symlink() and out.read_text().startswith("<!doctype html>")


def test_registry_backfill_gives_older_versions_their_run_records_from_their_tags(kiln_home, tmp_path):
    old, weights, _, _ = _version(kiln_home, tmp_path, "fp8", "k1", 7e-4, True, records=False)
    _add_sm90(kiln_home, tmp_path, old, weights)
    env = {"KILN_HOME": str(kiln_home)}
    first = run_kiln("registry", "backfill", env=env)
    assert first.returncode == 0, first.stderr
    assert "r-fp8/1: " in first.stdout and "1 version(s) backfilled" in first.stdout
    mlflow = client(kiln_home)
    run = mlflow.get_run(old.run_id).data
    assert (run.metrics["mean_kl"], run.metrics["sm90/mean_kl"], run.metrics["sm90/build_seconds"]) == (7e-4, 9e-4, 41.5)
    assert run.metrics["bits_per_weight"] == 8.0021   # from its kiln.metric.* tags
    assert (run.params["format"], run.params["recipe"], run.params["tool/nvidia-modelopt"]) == ("fp8", "r", "0.47.0")
    assert mlflow.get_model_version("r-fp8", old.version).tags[RUN_RECORDS] == "tags"
    assert "every version already has its run records" in run_kiln("registry", "backfill", env=env).stdout


def test_backfill_skips_a_version_whose_run_was_deleted_and_fills_the_others(kiln_home, tmp_path):
    """Issue 24.9: one deleted run stopped backfill with a traceback ("must be in the 'active' state")."""
    gone, *_ = _version(kiln_home, tmp_path, "fp8", "k1", 7e-4, True, records=False)
    kept, *_ = _version(kiln_home, tmp_path, "fp8", "k2", 6e-4, True, records=False)
    client(kiln_home).delete_run(gone.run_id)
    result = run_kiln("registry", "backfill", env={"KILN_HOME": str(kiln_home)})
    assert result.returncode == 0 and "Traceback" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"r-fp8/1: skipped: its run {gone.run_id} cannot take records (")
    assert lines[1].startswith("r-fp8/2: ") and lines[1].endswith("metrics and params added")
    assert lines[2] == "1 version(s) backfilled, 1 skipped"
    assert client(kiln_home).get_run(kept.run_id).data.metrics["mean_kl"] == 6e-4
