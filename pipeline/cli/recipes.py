"""`kiln check`, `plan`, `build`, `doctor` and `families`: what a recipe asks for, and building it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

import typer

from kiln.common.errors import KilnError, RecipeErrors
from kiln.pipeline.cli.common import emit_json, json_option, kiln_home, private_tempdir

_GPU_OPTION_HELP = ("Only this GPU architecture (an SM such as sm90, or a GPU name such as H100), as a CI "
                    "runner with that GPU does; other SMs are skipped.")


def _plan_for(recipe: Path, progress=None, gpu: str | None = None):
    from kiln.pipeline.plan.cache import StageCache
    from kiln.pipeline.plan.dag import make_plan
    from kiln.pipeline.recipe.loader import load_recipe
    from kiln.registry import tracking_uri

    home = kiln_home()
    warn = progress.log if progress else (lambda message: print(message, file=sys.stderr))
    cache = StageCache(home / "cache", warn=warn)
    loaded = load_recipe(recipe)
    the_plan = make_plan(loaded, home, cache, tracking_uri(home), gpu=gpu)
    if gpu is not None:
        problem = the_plan.host.compile_problem(the_plan.gpu, loaded.recipe.build.target, loaded.recipe.build.tp_size)
        if problem:
            warn(f"warning: --gpu {gpu}: this host cannot build {the_plan.gpu} ({problem}); only CPU stages will run")
    return the_plan, cache


def check(recipes: List[Path] = typer.Argument(..., help="Recipe YAML files.", show_default=False)) -> None:
    """Validate recipes: schema, names, sizes, what each named GPU can run, layer widths against block sizes,
    and whether the model fits this host's memory and GPUs (with CPU offload) at each stage's peak.

    Prints one line per problem (file:line: field: message (fix: ...)) and exits 2, or exits 0.
    """
    from kiln.compile import detect_host
    from kiln.pipeline.plan.memory import recipe_estimate
    from kiln.pipeline.data.fetch import checkable_model_folder
    from kiln.pipeline.plan.checks import data_problems, model_problems
    from kiln.pipeline.recipe.loader import load_recipe

    problems: list[str] = []
    host = detect_host()
    for path in recipes:
        try:
            loaded = load_recipe(path)
            problems += data_problems(loaded)
            folder = checkable_model_folder(loaded.recipe.model, loaded.resolve)
            if folder is not None:
                problems += model_problems(loaded, folder)
                memory = recipe_estimate(loaded, folder, host)
                refusal = memory and memory.refusal(str(path))
                if refusal:
                    problems.append(refusal)
        except RecipeErrors as exc:
            problems += exc.problems
        except KilnError as exc:
            problems.append(f"{path}: {exc}")
    if problems:
        raise RecipeErrors(problems)
    for path in recipes:
        print(f"{path}: ok")


def plan(
    recipes: List[Path] = typer.Argument(None, help="Recipe YAML file (with --changed-since: any number; default "
                                                    "recipes/*.yaml of the repository).", show_default=False),
    gpu: str = typer.Option(None, "--gpu", help=_GPU_OPTION_HELP, show_default=False),
    changed_since: str = typer.Option(None, "--changed-since", show_default=False,
                                      help="A git commit, branch or tag: list only what changed since it (recipe "
                                           "edits, kiln version, tool pins), with a recipe x GPU matrix for CI."),
    launcher: str = typer.Option(None, "--launcher", show_default=False,
                                 help="slurm | kubernetes: print what runs the recipe's calibration.nodes on a "
                                      "cluster instead of the plan (an sbatch script; a ConfigMap, headless Service "
                                      "and indexed Job): `kiln build --stage quantize` on every node against a "
                                      "shared KILN_HOME, then `kiln build` on node 0."),
    image: str = typer.Option("kiln:latest", "--image", help="--launcher kubernetes: the container image, with kiln "
                                                             "installed."),
    claim: str = typer.Option("kiln-home", "--claim", help="--launcher kubernetes: the ReadWriteMany volume claim "
                                                           "every pod mounts as KILN_HOME."),
    as_json: bool = json_option(),
) -> None:
    """List every stage instance with its key and status (cached, will run, skipped: reason), and each
    stage's estimated peak host and GPU memory for the recipe's model against this host; runs nothing.

    GPU stages (compile, engine-check and their publish, one per variant and SM) show
    `skipped: needs an sm90 GPU host with tensorrt_llm` where this host cannot run them.
    With --changed-since REF: the recipes and stage instances a merge since REF invalidates.
    With --launcher slurm|kubernetes: the file that runs it across calibration.nodes hosts, on stdout.
    """
    from kiln.common.errors import UserInputError
    from kiln.pipeline.report.tables import changes_table, family_line, plan_document, plan_table, stdout_console

    if changed_since is not None:
        from kiln.pipeline.plan.changes import changed_since as changes

        document = changes(changed_since, list(recipes or []), lambda path: _plan_for(path, gpu=gpu)[0])
        if as_json:
            emit_json(document)
        else:
            stdout_console.print(changes_table(document))
        return
    if not recipes or len(recipes) != 1:
        raise UserInputError("plan takes one recipe (fix: kiln plan RECIPE, or --changed-since REF for many)")
    the_plan, _ = _plan_for(recipes[0], gpu=gpu)
    if launcher is not None:
        from kiln.pipeline.plan.launchers import LAUNCHERS, launch_spec

        if launcher not in LAUNCHERS:
            raise UserInputError(f"--launcher {launcher}: kiln writes {' and '.join(LAUNCHERS)} files (fix: "
                                 f"--launcher {' or --launcher '.join(LAUNCHERS)})")
        sys.stdout.write(LAUNCHERS[launcher](launch_spec(the_plan, image, claim)))
        return
    memory = the_plan.memory()
    if as_json:
        emit_json({**plan_document(the_plan), "memory": memory.as_dict() if memory else None})
    else:
        stdout_console.print(plan_table(the_plan))
        line = family_line(the_plan)
        if line:
            stdout_console.print(line, soft_wrap=True)
        for name, path in the_plan.quantize_paths().items():
            stdout_console.print(f"{name}: quantize by the {path['why']}", soft_wrap=True)
        for note in the_plan.notes():
            stdout_console.print(note, soft_wrap=True)
        if memory is not None:
            from kiln.pipeline.plan.memory import memory_table

            stdout_console.print(memory_table(memory, the_plan.loaded.recipe.name))


def build(
    recipe: Path = typer.Argument(..., help="Recipe YAML file.", show_default=False),
    gpu: str = typer.Option(None, "--gpu", help=_GPU_OPTION_HELP, show_default=False),
    as_json: bool = json_option(),
    publish_failed: bool = typer.Option(False, "--publish-failed",
                                        help="Publish what fails its gates too, tagged failed and without aliases, "
                                             "for inspection and `kiln diff`; `kiln promote` refuses it."),
    share_registry_name: bool = typer.Option(False, "--share-registry-name",
                                             help="Publish even where another recipe/variant already owns the "
                                                  "registry name <recipe>-<variant> (refused by default)."),
    stage: str = typer.Option(None, "--stage", show_default=False,
                              help="quantize: run each variant's quantize stage into the cache and stop. What every "
                                   "node of calibration.nodes runs; a later `kiln build` validates and publishes "
                                   "from the cache."),
) -> None:
    """Run what the plan needs (quantize, validate, publish; on a GPU host also compile and the
    engine check per SM), then print the summary.

    Exits 3 when a variant or an engine fails its gate (it is then not published, unless
    --publish-failed). On a node other than 0 of calibration.nodes (KILN_NODE_RANK), it runs the
    quantize stage alone, as --stage quantize does.
    """
    from kiln.common.progress import ProgressReporter
    from kiln.pipeline.report.tables import (
        build_document, build_table, candidates_table, engines_table, runtime_checks_table, stdout_console, tasks_table,
    )
    from kiln.pipeline.run.runner import run_plan

    from kiln.common.errors import UserInputError

    if stage not in (None, "quantize"):
        raise UserInputError(f"--stage {stage}: kiln builds the quantize stage alone or everything (fix: --stage "
                             "quantize, or leave --stage out)")
    progress = ProgressReporter(enabled=True)
    the_plan, cache = _plan_for(recipe, progress, gpu)
    _refuse_what_cannot_fit(the_plan)
    private_tempdir()
    if stage == "quantize" or not _this_node_writes(the_plan):
        _build_quantize_stage(the_plan, cache, progress, as_json)
        return
    result = run_plan(the_plan, cache, progress, publish_failed=publish_failed, share_names=share_registry_name)
    if as_json:
        emit_json(build_document(result))
    else:
        stdout_console.print(build_table(result))
        if any(v.candidates or v.frontier for v in result.variants):
            stdout_console.print(candidates_table(result))
        if any(v.tasks for v in result.variants):
            stdout_console.print(tasks_table(result))
        if any(v.engines for v in result.variants):
            stdout_console.print(engines_table(result))
        if any(c.report for v in result.variants for c in v.runtime_checks):
            stdout_console.print(runtime_checks_table(result))
        _report_corrections(result, progress)
    raise typer.Exit(result.exit_code)


def _this_node_writes(the_plan) -> bool:
    """False on a node other than 0 of a calibration across nodes that has a quantize stage to run (one line, exit
    2, where KILN_NODE_RANK or KILN_RENDEZVOUS is missing or wrong)."""
    from kiln.quantize.distributed import Node

    nodes = the_plan.loaded.recipe.calibration.nodes
    if nodes == 1 or not any(i.status.will_run for i in the_plan.instances if i.stage == "quantize"):
        return True
    return Node.from_environment(nodes).writes


def _build_quantize_stage(the_plan, cache, progress, as_json: bool) -> None:
    from kiln.pipeline.run.runner import run_quantize_stage

    done = run_quantize_stage(the_plan, cache, progress)
    if as_json:
        emit_json({"stage": "quantize", "variants": [
            {"variant": d.variant, "key": d.key, "status": d.status, "seconds": d.seconds,
             "entry": str(d.entry) if d.entry else None} for d in done]})
        return
    for d in done:
        said = {"ran": f"quantized in {d.seconds:.1f} s", "cached": "cached",
                "node": "calibrated this node's share; node 0 writes the checkpoint"}[d.status]
        where = f" ({d.entry})" if d.entry else ""
        print(f"{d.variant}: quantize {d.key[:12]} {said}{where}")


def _refuse_what_cannot_fit(the_plan) -> None:
    """Before anything runs: a model that cannot fit this host even with offload is refused (exit 2)."""
    from kiln.common.errors import UserInputError

    if not any(i.status.will_run for i in the_plan.instances if i.stage in ("quantize", "validate")):
        return
    memory = the_plan.memory()
    refusal = memory and memory.refusal(str(the_plan.loaded.path))
    if refusal:
        raise UserInputError(refusal)


def _report_corrections(result, progress) -> None:
    """One note per distinct correction of ModelOpt's TensorRT-LLM configs, naming the variants it touched."""
    seen: dict[tuple, list[str]] = {}
    for v in result.variants:
        for c in v.trtllm_corrections:
            exported, corrected = (json.dumps(c[k], sort_keys=True) for k in ("exported", "corrected"))
            seen.setdefault((c["field"], exported, corrected, c["evidence"]), []).append(v.variant)
    for (field, exported, corrected, evidence), variants in seen.items():
        progress.log(f"note: ModelOpt's TensorRT-LLM config had {field}={exported}; kiln wrote {corrected} "
                     f"(proof: {evidence}) for {', '.join(variants)}")


def doctor(
    recipes: List[Path] = typer.Argument(None, help="Recipes to check against this host (optional).",
                                         show_default=False),
    as_json: bool = json_option(),
) -> None:
    """Print what this host can build: its GPUs and their SM, the CUDA driver, TensorRT,
    TensorRT-LLM and ModelOpt versions, which targets (and recipe variants) it can compile, and
    each recipe's estimated peak memory per stage against this host's memory and GPUs.

    GPUs are found through NVML or nvidia-smi; CUDA is never initialised.
    """
    from kiln.compile import detect_host
    from kiln.pipeline.cli.doctor import doctor_document, doctor_tables
    from kiln.pipeline.recipe.loader import load_recipe
    from kiln.pipeline.report.tables import stdout_console

    from kiln.pipeline.plan.memory import memory_table, recipe_estimate
    from kiln.pipeline.data.fetch import checkable_model_folder

    host = detect_host()
    loaded = [load_recipe(path) for path in recipes or ()]
    estimates = {str(r.path): recipe_estimate(r, checkable_model_folder(r.recipe.model, r.resolve), host)
                 for r in loaded}
    document = doctor_document(host, loaded)
    document["memory"] = {path: e.as_dict() if e else None for path, e in estimates.items()}
    if as_json:
        emit_json(document)
    else:
        for table in doctor_tables(document):
            stdout_console.print(table)
        for path, estimate in estimates.items():
            if estimate is not None:
                stdout_console.print(memory_table(estimate, path))


def families(
    as_json: bool = json_option(),
    markdown: bool = typer.Option(False, "--markdown", help="Print the README's Markdown table."),
) -> None:
    """Print the model-family table: per Hugging Face model_type, whether kiln writes a TensorRT-LLM
    checkpoint (target trtllm-engine) and which family fields it fills, the formats TensorRT-LLM
    supports per target, the KV-cache formats, and where each fact comes from.

    `kiln check` refuses any family or family x format this table does not hold.
    """
    from kiln.pipeline.cli.families_doc import families_markdown, family_document
    from kiln.quantize import FAMILIES

    if as_json:
        emit_json([family_document(f) for f in FAMILIES.values()])
    else:
        sys.stdout.write(families_markdown())
