"""`kiln ls`, `pull`, `promote`, `diff`, `report` and `kiln registry …` (a team registry: PostgreSQL + mlflow server)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import List

import typer

from kiln.common.errors import UserInputError
from kiln.pipeline.cli.common import REF_HELP, emit_json, json_option, kiln_home, private_tempdir, selected_sm

registry_app = typer.Typer(help="Run a team registry: PostgreSQL plus `mlflow server` with proxied artifacts. "
                                "Point kiln at it with MLFLOW_TRACKING_URI=http://HOST:PORT. `backfill` gives "
                                "versions an older kiln published their MLflow metrics and params.",
                           no_args_is_help=True)


@registry_app.command("postgres", short_help="Start PostgreSQL for a team registry in a folder.")
def postgres(
    data: Path = typer.Option(..., "--data", help="The database's folder (created and initialised on first use)."),
    port: int = typer.Option(5432, "--port", help="Port on --host."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address PostgreSQL listens on."),
    stop: bool = typer.Option(False, "--stop", help="Stop the server of that folder instead."),
) -> None:
    """Start Debian's PostgreSQL in a folder of its own and create the `mlflow` database.

    Prints the --backend-store-uri for `kiln registry serve`. Use your own PostgreSQL instead if
    you have one: any database `mlflow server` accepts works.
    """
    from kiln.registry.team import LocalPostgres

    database = LocalPostgres(data.resolve(), port, host)
    if stop:
        database.stop()
        print(f"PostgreSQL in {database.data} stopped")
        return
    database.start()
    print(f"PostgreSQL running from {database.data} on {host}:{port}")
    print(f"backend store: {database.uri}")


@registry_app.command("serve", short_help="Run `mlflow server` for a team registry until Ctrl-C.")
def serve_registry(
    backend_store_uri: str = typer.Option(..., "--backend-store-uri",
                                          help="Where versions and tags live, e.g. postgresql://kiln@db:5432/mlflow."),
    artifacts_destination: str = typer.Option(..., "--artifacts-destination",
                                              help="Where the files live (a folder, s3://…, gs://…); clients "
                                                   "reach them through this server only."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for a team network)."),
    port: int = typer.Option(5000, "--port", help="Port to listen on."),
    workers: int = typer.Option(4, "--workers", min=1, help="Server worker processes."),
    log: Path = typer.Option(None, "--log", help="Append the server's log here (default: discard)."),
) -> None:
    """Run `mlflow server` with proxied artifacts until Ctrl-C; kiln needs only MLFLOW_TRACKING_URI.

    Example: kiln registry postgres --data /srv/kiln/db, then
    kiln registry serve --backend-store-uri postgresql://kiln@127.0.0.1:5432/mlflow
    --artifacts-destination /srv/kiln/artifacts --host 0.0.0.0
    """
    from kiln.registry.team import MlflowServer

    destination = artifacts_destination
    if "://" not in destination:
        destination = str(Path(destination).resolve())
    server = MlflowServer(backend_store_uri, destination, host, port, workers, log).start()
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        shown = "127.0.0.1" if host == "0.0.0.0" else host
        print(f"registry ready: export MLFLOW_TRACKING_URI=http://{shown}:{port}")
        sys.stdout.flush()
        while not stop.wait(0.5):
            if server.process.poll() is not None:
                print(f"mlflow server exited {server.process.returncode}", file=sys.stderr)
                raise typer.Exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()


@registry_app.command("backfill", short_help="MLflow metrics and params for older versions.")
def backfill_records() -> None:
    """Give versions an older kiln published their MLflow metrics and params, read from their tags.

    Metrics (the checkpoint's, each SM's, each runtime check's) and params (format, KV format, group size,
    algorithm, recipe digest, tools) land on each version's run, where MLflow's UI charts them. A version
    that has them is left alone; a later build of its recipe adds its size and calibration.
    """
    from kiln.registry import backfill

    done = backfill(kiln_home())
    for label, added in done:
        print(f"{label}: {added} metrics and params added" if isinstance(added, int) else f"{label}: {added}")
    filled = sum(isinstance(added, int) for _, added in done)
    skipped = len(done) - filled
    print(f"{filled} version(s) backfilled" + (f", {skipped} skipped" if skipped else "") if done
          else "every version already has its run records")


@registry_app.command("verify", short_help="Check that every version can be pulled, and its structure.")
def verify(
    sources: List[Path] = typer.Option(None, "--source", show_default=False,
                                       help="A local source model folder the structure checks may compare against "
                                            "(used for the versions whose recorded content digest it has; repeat "
                                            "for several)."),
    as_json: bool = json_option(),
) -> None:
    """Check that every version can be pulled, changing nothing: exit 1 if any cannot.

    Each version's run must exist, its manifests must match the digests its tags record, every file they
    list must have the bytes its sha256 names (in the blob store, hashed in place on the embedded registry,
    downloaded from a server; or in its own run), and its metric tags must equal its stored validation.json
    and tasks.json. A version that fails names the first problem and the fix; one verify cannot check is
    counted apart. A missing or empty registry database is reported and left as it is.

    Then the structure checks run again on each version's stored checkpoint against its source model, where
    this host has it: a hub source's pinned revision in the Hugging Face cache (never downloaded), a local one
    given with --source. A version that passed its gates and now fails them cannot be trusted: exit 1.
    """
    from kiln.common.errors import KilnError
    from kiln.common.progress import ProgressReporter
    from kiln.pipeline.run.recheck import StructureRecheck, structure_line
    from kiln.registry.verify import verify_registry

    for folder in sources or []:
        if not (folder / "config.json").is_file():
            raise UserInputError(f"--source {folder}: not a model folder with a config.json (fix: the folder the "
                                 "recipe's model.source named)")
    progress = ProgressReporter()
    checks = verify_registry(kiln_home(), progress, recheck=StructureRecheck(list(sources or []), progress))
    if as_json:
        emit_json([check.as_dict() for check in checks])
    else:
        for check in checks:
            state = (f"not pullable: {check.problem}" if check.problem else f"not checked: {check.note}"
                     if check.unchecked else f"ok ({check.files} files, {check.bytes} bytes verified)")
            print(f"{check.label}: {state}{structure_line(check.structure)}")
    broken = [check.label for check in checks if check.problem]
    unchecked = [check.label for check in checks if check.unchecked]
    # A version published as failing its gates (--publish-failed) may fail them again; one that passed may not.
    faulty = [check.label for check in checks if (check.structure or {}).get("passed") is False
              and check.structure.get("published_as_passed")]
    if broken or unchecked or faulty:
        parts = [f"{len(broken)} of {len(checks)} version(s) cannot be pulled: {_first(broken)}"] if broken else []
        parts += [f"{len(unchecked)} could not be checked: {_first(unchecked)}"] if unchecked else []
        parts += [f"{len(faulty)} fail the structure checks: {_first(faulty)}"] if faulty else []
        raise KilnError(f"{'; '.join(parts)}; nothing was changed")
    if not as_json:
        rechecked = sum(bool((check.structure or {}).get("rechecked")) for check in checks)
        again = f"; the structure checks passed again on {rechecked} of them" if rechecked else ""
        print(f"{len(checks)} version(s): every one can be pulled{again}" if checks
              else "the registry holds no version")


def _first(labels: list[str]) -> str:
    return ", ".join(labels[:5]) + (" …" if len(labels) > 5 else "")


def _versions_named(refs: list[str], count: int) -> tuple[str, list[str]]:
    """One registered model's `count` versions, from references (NAME/VERSION, NAME@ALIAS) or, as older kiln
    took them, a bare NAME followed by `count` version numbers."""
    from kiln.registry import named_version

    home = kiln_home()
    if len(refs) == count + 1 and "/" not in refs[0] and "@" not in refs[0]:
        refs = [f"{refs[0]}/{v}" for v in refs[1:]]
    if len(refs) != count:
        raise UserInputError(f"{' '.join(refs)}: give {count} reference(s) NAME/VERSION or NAME@ALIAS (fix: e.g. "
                             f"{' '.join(['demo-fp8/2', 'demo-fp8/3'][:count])})")
    named = [named_version(home, ref) for ref in refs]
    if len({name for name, _ in named}) != 1:
        raise UserInputError(f"{' '.join(refs)}: versions of one registered model only (fix: use one NAME)")
    return named[0][0], [version for _, version in named]


def promote(
    refs: List[str] = typer.Argument(..., metavar="REF", show_default=False,
                                     help=f"{REF_HELP} NAME VERSION, as older kiln took it, works too."),
    alias: str = typer.Option(..., "--alias", help="The alias to move, e.g. production or candidate."),
    force: bool = typer.Option(False, "--force", help="Move it even past failed gates (needs --reason)."),
    reason: str = typer.Option(None, "--reason", help="Why you force it; recorded on the version with your name."),
    as_json: bool = json_option(),
) -> None:
    """Point an alias at a version, only if its checkpoint and every SM it holds passed their gates.

    A failed or missing gate result refuses it (exit 3). --force --reason "why" overrides and
    records who, when, why and what it overrode as kiln.promotion.<alias>.* tags on the version.
    """
    from kiln.registry import promote as promote_version

    name, (version,) = _versions_named(refs, 1)
    done = promote_version(kiln_home(), name, version, alias, force, reason)
    if as_json:
        emit_json({"name": done.name, "version": done.version, "alias": done.alias, "previous": done.previous,
                    "forced": done.forced, "overridden": list(done.overridden)})
        return
    was = f" (was {done.previous})" if done.previous and done.previous != done.version else ""
    forced = f"; forced past: {'; '.join(done.overridden)}" if done.forced else ""
    print(f"{done.name}@{done.alias} -> {done.version}{was}{forced}")


def diff(
    refs: List[str] = typer.Argument(..., metavar="REF REF", show_default=False,
                                     help=f"The older version, then the newer. {REF_HELP} NAME V1 V2, as older kiln "
                                          "took them, works too."),
    as_json: bool = json_option(),
) -> None:
    """What changed between two versions: recipe fields, tool versions, metrics, gates, quant auto's layer formats,
    SMs, file digests."""
    from kiln.pipeline.report.tables import diff_tables, stdout_console
    from kiln.registry import diff as diff_versions

    name, (first, second) = _versions_named(refs, 2)
    document = diff_versions(kiln_home(), name, first, second)
    if as_json:
        emit_json(document)
        return
    for table in diff_tables(document):
        stdout_console.print(table)


def list_registry(as_json: bool = json_option()) -> None:
    """List registered models, their versions, aliases and metrics."""
    from kiln.pipeline.report.tables import stdout_console, versions_table
    from kiln.registry import list_versions

    rows = list_versions(kiln_home())
    if as_json:
        emit_json(rows)
    else:
        stdout_console.print(versions_table(rows))


def pull(
    ref: str = typer.Argument(..., help=REF_HELP, show_default=False),
    out: Path = typer.Option(..., "--out", help="Folder to create; must not exist or be empty."),
    gpu: str = typer.Option(None, "--gpu", show_default=False,
                            help="Whose engines to fetch: an SM (sm90) or GPU name; `none` for the checkpoint only. "
                                 "Default: this host's GPU, or none on a host without one."),
    as_json: bool = json_option(),
) -> None:
    """Download a registry version and verify every file against its manifest (exit 1 on any mismatch).

    Fetches the checkpoint, tokenizer and reports, plus the engines of one SM only. Refuses (exit 2)
    an SM the version holds no engines for, and engines built with another TensorRT than this host's.
    """
    from kiln.compile import detect_host
    from kiln.common.progress import ProgressReporter
    from kiln.registry import pull as pull_version

    private_tempdir()
    host = detect_host()
    sm = None if gpu is not None and gpu.lower() == "none" else selected_sm(gpu, host)
    pulled = pull_version(kiln_home(), ref, out, ProgressReporter(), sm=sm, installed_tensorrt=host.tensorrt)
    if as_json:
        emit_json({"name": pulled.name, "version": pulled.version, "path": str(pulled.path), "sm": pulled.sm,
                    "files": pulled.files, "bytes": pulled.bytes, "verified": True})
    else:
        engines = f" with {pulled.sm} engines" if pulled.sm else " (checkpoint only)"
        print(f"{pulled.name}/{pulled.version}{engines} -> {pulled.path}: {pulled.files} files, {pulled.bytes} bytes, "
              "all verified")


def report(
    recipe: Path = typer.Argument(..., help="The recipe whose published versions to show, e.g. recipes/demo.yaml.",
                                  show_default=False),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write (replaced atomically)."),
) -> None:
    """Write one self-contained HTML page of what a recipe published: open it in any browser, offline.

    Accuracy against size: bits per weight against KL, with the gates and the unquantized model.

    Each variant's metrics over its registry versions, gates and failures, engines per SM, runtimes.

    It reads the registry kiln uses: $KILN_HOME's own, or the server MLFLOW_TRACKING_URI names.

    Example: kiln report recipes/demo.yaml --out build/report.html
    """
    from kiln.common.errors import UserInputError
    from kiln.pipeline.recipe.loader import load_recipe
    from kiln.pipeline.report.page import write_report
    from kiln.registry import recipe_versions, tracking_uri

    loaded = load_recipe(recipe)
    if out.is_dir():
        raise UserInputError(f"--out {out} is a folder (fix: name the HTML file, e.g. --out {out / 'report.html'})")
    home = kiln_home()
    rows = recipe_versions(home, loaded.recipe.name)
    if not rows:
        raise UserInputError(f"{recipe}: the registry ({tracking_uri(home)}) holds no version of recipe "
                             f"'{loaded.recipe.name}' (fix: `kiln build {recipe}` first)")
    try:
        written = write_report(loaded.recipe, tracking_uri(home), rows, out)
    except OSError as exc:   # a folder that cannot be written: nothing was (the write is atomic)
        raise UserInputError(f"--out {out}: cannot write there ({exc.strerror or exc}) (fix: choose a file in a "
                             "folder you can write to)") from None
    print(written.resolve())
