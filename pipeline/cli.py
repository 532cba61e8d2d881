"""The `kiln` command line: check, plan, build, ls, pull, doctor, families, triton-repo, serve.

Data (tables, JSON) goes to stdout; progress, warnings and errors to stderr.
Exit codes: 0 ok, 1 failure (including verification), 2 bad input, 3 a gate failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Iterator, List

import typer

from kiln.common.errors import KilnError, RecipeErrors

app = typer.Typer(
    name="kiln",
    help="Quantize Hugging Face models, check their accuracy, and publish verified artifacts.\n\n"
    "Start with `kiln check recipes/demo.yaml`, then `kiln plan` and `kiln build`. "
    "`kiln doctor` says what this host can build.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def kiln_home() -> Path:
    return Path(os.environ.get("KILN_HOME") or Path.home() / ".kiln").expanduser()


@contextlib.contextmanager
def _reported_errors() -> Iterator[None]:
    """One line per problem on stderr and the error's exit code; --debug adds the traceback."""
    try:
        yield
    except KilnError as exc:
        if _state["debug"]:
            traceback.print_exc()
        lines = exc.problems if isinstance(exc, RecipeErrors) else [str(exc)]
        for line in lines:
            print(f"kiln: {line}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        print(f"kiln: {what}; completed cache entries are kept, partial ones discarded", file=sys.stderr)
        raise typer.Exit(code) from None
    except Exception as exc:
        from kiln.pipeline.failures import known_failure

        known = known_failure(exc)
        if known is None:
            raise
        if _state["debug"]:
            traceback.print_exc()
        print(f"kiln: {known}", file=sys.stderr)
        raise typer.Exit(known.exit_code) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM (CI cancellation, `timeout`, `kill`), unwound like Ctrl-C: partial folders are discarded."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second SIGTERM ends the process at once
    raise Terminated()


def private_tempdir() -> None:
    """Temporary files of commands that write go to $KILN_HOME/tmp/<this process>, removed at exit, and
    those that killed kiln processes left are removed first."""
    from kiln.common.scratch import use_private_tempdir

    use_private_tempdir(kiln_home())


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and library output.")) -> None:
    _state["debug"] = debug
    if debug:
        os.environ["KILN_DEBUG"] = "1"


def _emit_json(document) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


_GPU_OPTION_HELP = ("Build only this GPU architecture (an SM such as sm90, or a GPU name such as H100), "
                    "as a CI runner with that GPU does; other SMs are skipped.")


def _plan_for(recipe: Path, progress=None, gpu: str | None = None):
    from kiln.pipeline.cache import StageCache
    from kiln.pipeline.plan import make_plan
    from kiln.pipeline.recipe_loader import load_recipe
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


@app.command()
def check(recipes: List[Path] = typer.Argument(..., help="Recipe YAML files.", show_default=False)) -> None:
    """Validate recipes: schema, names, sizes, what each named GPU can run, layer widths against block sizes,
    and whether the model fits this host's memory and GPUs (with CPU offload) at each stage's peak.

    Prints one line per problem (file:line: field: message (fix: ...)) and exits 2, or exits 0.
    """
    from kiln.compile import detect_host
    from kiln.pipeline.memory import recipe_estimate
    from kiln.pipeline.plan import checkable_model_folder, data_problems, model_problems
    from kiln.pipeline.recipe_loader import load_recipe

    problems: list[str] = []
    with _reported_errors():
        host = detect_host()
        for path in recipes:
            try:
                loaded = load_recipe(path)
                problems += data_problems(loaded)
                folder = checkable_model_folder(loaded)
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


@app.command()
def plan(
    recipes: List[Path] = typer.Argument(None, help="Recipe YAML file (with --changed-since: any number; default "
                                                    "recipes/*.yaml of the repository).", show_default=False),
    gpu: str = typer.Option(None, "--gpu", help=_GPU_OPTION_HELP, show_default=False),
    changed_since: str = typer.Option(None, "--changed-since", show_default=False,
                                      help="A git commit, branch or tag: list only what changed since it (recipe "
                                           "edits, kiln version, tool pins), with a recipe x GPU matrix for CI."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """List every stage instance with its key and status (cached, will run, skipped: reason), and each
    stage's estimated peak host and GPU memory for the recipe's model against this host; runs nothing.

    GPU stages (compile, engine-check and their publish, one per variant and SM) show
    `skipped: needs an sm90 GPU host with tensorrt_llm` where this host cannot run them.
    With --changed-since REF: the recipes and stage instances a merge since REF invalidates.
    """
    from kiln.common.errors import UserInputError
    from kiln.pipeline.report import changes_table, family_line, plan_document, plan_table, stdout_console

    if changed_since is not None:
        from kiln.pipeline.changes import changed_since as changes

        with _reported_errors():
            document = changes(changed_since, list(recipes or []), lambda path: _plan_for(path, gpu=gpu)[0])
        if as_json:
            _emit_json(document)
        else:
            stdout_console.print(changes_table(document))
        return
    with _reported_errors():
        if not recipes or len(recipes) != 1:
            raise UserInputError("plan takes one recipe (fix: kiln plan RECIPE, or --changed-since REF for many)")
        the_plan, _ = _plan_for(recipes[0], gpu=gpu)
    memory = the_plan.memory()
    if as_json:
        _emit_json({**plan_document(the_plan), "memory": memory.as_dict() if memory else None})
    else:
        stdout_console.print(plan_table(the_plan))
        line = family_line(the_plan)
        if line:
            stdout_console.print(line, soft_wrap=True)
        if memory is not None:
            from kiln.pipeline.memory import memory_table

            stdout_console.print(memory_table(memory, the_plan.loaded.recipe.name))


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="Recipe YAML file.", show_default=False),
    gpu: str = typer.Option(None, "--gpu", help=_GPU_OPTION_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout instead of the table."),
    publish_failed: bool = typer.Option(False, "--publish-failed",
                                        help="Publish what fails its gates too, tagged failed and without aliases, "
                                             "for inspection and `kiln diff`; `kiln promote` refuses it."),
    share_registry_name: bool = typer.Option(False, "--share-registry-name",
                                             help="Publish even where another recipe/variant already owns the "
                                                  "registry name <recipe>-<variant> (refused by default)."),
) -> None:
    """Run what the plan needs (quantize, validate, publish; on a GPU host also compile and the
    engine check per SM), then print the summary.

    Exits 3 when a variant or an engine fails its gate (it is then not published, unless
    --publish-failed).
    """
    from kiln.common.progress import ProgressReporter
    from kiln.pipeline.report import build_document, build_table, engines_table, stdout_console
    from kiln.pipeline.runner import run_plan

    progress = ProgressReporter(enabled=True)
    with _reported_errors():
        the_plan, cache = _plan_for(recipe, progress, gpu)
        _refuse_what_cannot_fit(the_plan)
        private_tempdir()
        result = run_plan(the_plan, cache, progress, publish_failed=publish_failed, share_names=share_registry_name)
    if as_json:
        _emit_json(build_document(result))
    else:
        stdout_console.print(build_table(result))
        if any(v.engines for v in result.variants):
            stdout_console.print(engines_table(result))
        _report_corrections(result, progress)
    raise typer.Exit(result.exit_code)


def _refuse_what_cannot_fit(the_plan) -> None:
    """Before anything runs: a model that cannot fit this host even with offload is refused (exit 2)."""
    from kiln.common.errors import UserInputError

    if not any(i.status == "will run" for i in the_plan.instances if i.stage in ("quantize", "validate")):
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


@app.command("ls")
def list_registry(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List registered models, their versions, aliases and metrics."""
    from kiln.pipeline.report import stdout_console, versions_table
    from kiln.registry import list_versions

    with _reported_errors():
        rows = list_versions(kiln_home())
    if as_json:
        _emit_json(rows)
    else:
        stdout_console.print(versions_table(rows))


@app.command()
def pull(
    ref: str = typer.Argument(..., help="NAME@ALIAS or NAME/VERSION, e.g. demo-fp8@candidate.", show_default=False),
    out: Path = typer.Option(..., "--out", help="Folder to create; must not exist or be empty."),
    gpu: str = typer.Option(None, "--gpu", show_default=False,
                            help="Whose engines to fetch: an SM (sm90) or GPU name; `none` for the checkpoint only. "
                                 "Default: this host's GPU, or none on a host without one."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a line."),
) -> None:
    """Download a registry version and verify every file against its manifest (exit 1 on any mismatch).

    Fetches the checkpoint, tokenizer and reports, plus the engines of one SM only. Refuses (exit 2)
    an SM the version holds no engines for, and engines built with another TensorRT than this host's.
    """
    from kiln.compile import detect_host
    from kiln.common.progress import ProgressReporter
    from kiln.registry import pull as pull_version

    with _reported_errors():
        private_tempdir()
        host = detect_host()
        sm = None if gpu is not None and gpu.lower() == "none" else selected_sm(gpu, host)
        pulled = pull_version(kiln_home(), ref, out, ProgressReporter(), sm=sm, installed_tensorrt=host.tensorrt)
    if as_json:
        _emit_json({"name": pulled.name, "version": pulled.version, "path": str(pulled.path), "sm": pulled.sm,
                    "files": pulled.files, "bytes": pulled.bytes, "verified": True})
    else:
        engines = f" with {pulled.sm} engines" if pulled.sm else " (checkpoint only)"
        print(f"{pulled.name}/{pulled.version}{engines} -> {pulled.path}: {pulled.files} files, {pulled.bytes} bytes, "
              "all verified")


def selected_sm(gpu: str | None, host) -> str | None:
    """--gpu as an SM (sm90, H100, ...); default: this host's first GPU's SM, or None without one."""
    from kiln.compile import resolve_gpu
    from kiln.common.errors import UserInputError

    if gpu is None:
        return host.sms[0] if host.sms else None
    try:
        return resolve_gpu(gpu).sm
    except ValueError as exc:
        raise UserInputError(f"--gpu: {exc}") from None


@app.command()
def doctor(
    recipes: List[Path] = typer.Argument(None, help="Recipes to check against this host (optional).",
                                         show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Print what this host can build: its GPUs and their SM, the CUDA driver, TensorRT,
    TensorRT-LLM and ModelOpt versions, which targets (and recipe variants) it can compile, and
    each recipe's estimated peak memory per stage against this host's memory and GPUs.

    GPUs are found through NVML or nvidia-smi; CUDA is never initialised.
    """
    from kiln.compile import detect_host
    from kiln.pipeline.doctor import doctor_document, doctor_tables
    from kiln.pipeline.recipe_loader import load_recipe
    from kiln.pipeline.report import stdout_console

    from kiln.pipeline.memory import memory_table, recipe_estimate
    from kiln.pipeline.plan import checkable_model_folder

    with _reported_errors():
        host = detect_host()
        loaded = [load_recipe(path) for path in recipes or ()]
        estimates = {str(r.path): recipe_estimate(r, checkable_model_folder(r), host) for r in loaded}
    document = doctor_document(host, loaded)
    document["memory"] = {path: e.as_dict() if e else None for path, e in estimates.items()}
    if as_json:
        _emit_json(document)
    else:
        for table in doctor_tables(document):
            stdout_console.print(table)
        for path, estimate in estimates.items():
            if estimate is not None:
                stdout_console.print(memory_table(estimate, path))


@app.command()
def families(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the README's Markdown table."),
) -> None:
    """Print the model-family table: per Hugging Face model_type, whether kiln writes a TensorRT-LLM
    checkpoint (target trtllm-engine) and which family fields it fills, the formats TensorRT-LLM
    supports per target, the KV-cache formats, and where each fact comes from.

    `kiln check` refuses any family or family x format this table does not hold.
    """
    from kiln.pipeline.families_doc import families_markdown, family_document
    from kiln.quantize import FAMILIES

    if as_json:
        _emit_json([family_document(f) for f in FAMILIES.values()])
    else:
        sys.stdout.write(families_markdown())


from kiln.pipeline import cli_serve  # noqa: E402,F401  (registers triton-repo and serve on `app`)
from kiln.pipeline import cli_registry  # noqa: E402,F401  (registers `registry`, promote and diff)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app()


if __name__ == "__main__":
    main()
