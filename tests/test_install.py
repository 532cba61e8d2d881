"""kiln installs under one namespace and never pulls TensorRT or a CUDA torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO


def test_imports_from_outside_the_repo(tmp_path):
    code = (
        "import importlib.util, kiln.common, kiln.pipeline, kiln.quantize, kiln.validate, kiln.registry, kiln.compile, kiln.serve;"
        "print(kiln.pipeline.__version__);"
        "print(all(importlib.util.find_spec(n) is None for n in ('common', 'pipeline', 'quantize', 'validate', 'registry')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    version, no_generic_names = result.stdout.split()
    assert version.count(".") >= 2
    assert no_generic_names == "True"


def test_wheel_holds_only_the_kiln_namespace(tmp_path):
    """What `pip install .` installs: every module under kiln/, no top-level pipeline/ or compile/."""
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree it builds.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".cache", ".git", "build", "*.egg-info"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    wheel = next(Path(tmp_path).glob("kiln-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    modules = [n for n in names if n.endswith(".py")]
    assert "kiln/pipeline/cli/app.py" in modules and "kiln/quantize/formats.py" in modules
    pipeline = {f"kiln/{p.relative_to(REPO).as_posix()}" for p in (REPO / "pipeline").rglob("*.py")}
    assert pipeline <= set(modules), pipeline - set(modules)   # every sub-package is listed in pyproject.toml
    assert not any("testmodel" in n for n in modules)   # development tooling (tests/testmodel.py) stays out
    assert "kiln/serve/cpu_model/model.py" in modules   # copied into every CPU Triton repository
    assert all(n.startswith("kiln/") for n in modules), [n for n in modules if not n.startswith("kiln/")]
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines() if line.startswith("Requires-Dist")]
    default = [r for r in requires if "extra ==" not in r]
    assert not any(r.split(":")[1].strip().startswith(("torch", "tensorrt")) for r in default), default
    assert any("typer" in r and "<" in r for r in default), "typer needs an upper bound"


def _commands(group, prefix=()):
    """Every command of the CLI as (path, click command), subcommands of groups included."""
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))


def help_problems(app) -> list[str]:
    """What `--help` fails to teach: a command without a sentence of help, an option or argument without its
    own help text. Options Typer adds itself (--help) are not counted."""
    import typer

    problems = []
    for path, command in _commands(typer.main.get_command(app)):
        name = " ".join(path)
        if len((command.help or "").split()) < 4:
            problems.append(f"{name}: no help sentence")
        for param in command.params:
            if param.name != "help" and len((getattr(param, "help", None) or "").split()) < 2:
                problems.append(f"{name} {param.name}: no help")
    return problems


def test_cli_help_teaches():
    import typer

    from kiln.pipeline.cli.app import app
    from tests.conftest import run_kiln

    assert help_problems(app) == []
    result = run_kiln("--help")
    assert result.returncode == 0
    commands = result.stdout.split("Commands:", 1)[1].splitlines()
    listed = {line.split()[0] for line in commands if line.startswith("  ") and len(line.split()) > 1}
    assert set(typer.main.get_command(app).commands) <= listed, listed   # every command, named in the listing
    build_help = run_kiln("build", "--help").stdout
    assert "--json" in build_help and "Exits 3" in build_help


def test_the_help_check_can_fail():
    import typer

    bare = typer.Typer()

    @bare.command()
    def taught(out: str = typer.Option(..., help="Where the files go.")):
        """Pull a version and verify every file."""

    @bare.command()
    def untaught(out: str = typer.Option(...)):
        pass

    assert help_problems(bare) == ["untaught: no help sentence", "untaught out: no help"]


def help_layout_problems(text: str, width: int = 80) -> list[str]:
    """What makes a help page read badly at `width` columns: a line past it, a cut ("..."), a `<bool>` on a flag,
    or a line broken before the next word had to (a docstring's own line break kept mid-sentence)."""
    problems = []
    lines = text.splitlines()
    in_description = True
    for a, b in zip(lines, lines[1:] + [""]):
        cut = a.rstrip().endswith(("...", "…")) and not a.startswith("Usage:")   # usage's [ARGS]... is syntax
        if cut or len(a) > width or "<bool>" in a:
            problems.append(a)
        if a.endswith(":") and not a.startswith(" "):   # Options:, Arguments:, Commands:
            in_description = False
        if not a.strip() or not b.strip() or a.endswith("-"):
            continue
        if not in_description and "  " not in a.strip():   # a long option name alone; its help starts below
            continue
        indent_a, indent_b = len(a) - len(a.lstrip()), len(b) - len(b.lstrip())
        continuation = indent_b == indent_a if in_description else indent_b > 2
        if continuation and len(a) + 1 + len(b.split()[0]) <= width:
            problems.append(f"broken early: {a.strip()!r} / {b.strip()!r}")
    return problems


def test_every_help_page_reads_well_at_80_columns():
    import click
    import typer

    from kiln.pipeline.cli.app import app

    pages = 0
    for path, command in [((), typer.main.get_command(app)), *_commands(typer.main.get_command(app))]:
        context = click.Context(command, info_name=" ".join(("kiln", *path)), terminal_width=80, max_content_width=80)
        text = command.get_help(context)
        assert help_layout_problems(text) == [], f"kiln {' '.join(path)} --help:\n{text}"
        pages += 1
    assert pages > 15
    # The check can fail: two docstring line breaks mid-sentence, a flag's <bool>, a cut line.
    assert len(help_layout_problems("  Print the model-family table: per Hugging Face model_type,\n"
                                    "  whether kiln writes a TensorRT-LLM\n  checkpoint (target trtllm-engine).\n"
                                    "Options:\n  --debug <bool>  Show tracebacks.\n  check  Validate recipes...")) == 4


# Options whose name several commands use for different things: one help each is right.
MEANS_DIFFERENT_THINGS = {
    "--gpu": "build/plan: the one SM to build; pull: whose engines, or none; triton-repo: whose engines to serve",
    "--out": "a folder to create (pull, triton-repo), the HTML file (report)",
    "--host": "PostgreSQL's address, mlflow server's", "--port": "PostgreSQL's port, mlflow server's",
}


def test_an_option_shared_by_commands_has_one_help():
    """Issue 37.6: serve and triton-repo declared five shared options whose help drifted apart; --json had 7 texts."""
    import typer

    from kiln.pipeline.cli.app import app

    helps: dict[str, set[str]] = {}
    for _, command in _commands(typer.main.get_command(app)):
        for param in command.params:
            if getattr(param, "param_type_name", "") == "option":
                helps.setdefault(param.opts[0], set()).add(param.help)
    drifted = {option for option, texts in helps.items() if len(texts) > 1}
    assert drifted == set(MEANS_DIFFERENT_THINGS), drifted
    assert len(helps["--json"]) == 1 and len(helps["--stack"]) == 1 and len(helps["--max-tokens"]) == 1
