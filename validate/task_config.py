"""What an lm-eval task YAML makes lm-eval read and run, found before lm-eval sees it.

lm-eval's own loader imports and runs Python for every `!function module.name` (a module beside the
YAML, or any importable one: `!function os.system`), follows `include:` anywhere on the disk, and its
TaskManager opens every YAML in the folder it is given. kiln reads the task first, with its own rules:
  - every file it reads (the YAML, its includes, its function modules, its data files) is a regular
    file inside the task YAML's folder, of bounded size (TASK_FILE_BYTES for YAML and Python, DATA_FILE_BYTES
    for data); YAML aliases are refused (a few lines of them expand to gigabytes);
  - `!function` is refused unless the recipe sets `evaluation.allow_task_code: true`, and then only for
    modules that are files beside the YAML (what kiln can hash); the build log says what runs;
  - every one of those files goes into the validate stage's key, and lm-eval is handed a private copy of
    exactly those files (`stage`), never the user's folder.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml

from kiln.common.errors import UserInputError

TASK_FILE_BYTES = 1 << 20
DATA_FILE_BYTES = 256 << 20
_MAX_INCLUDES = 32


@dataclass(frozen=True)
class TaskFiles:
    folder: Path                      # the task YAML's folder: every file below is inside it
    yaml: Path                        # the task YAML the recipe names
    files: tuple[Path, ...]           # every file lm-eval reads for this task (the YAML first)
    functions: tuple[str, ...] = ()   # `!function` references, where the recipe allows task code
    unsafe_code: bool = False         # the task runs generated code (its YAML says so): the recipe must allow it

    def relative(self) -> list[str]:
        return [path.relative_to(self.folder).as_posix() for path in self.files]

    def stage(self, into: Path) -> Path:
        """Copy exactly this task's files into `into` (a fresh folder) and return the copied YAML's path."""
        for path in self.files:
            copy = into / path.relative_to(self.folder)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
        return into / self.yaml.relative_to(self.folder)


def task_files(path: Path, name: str, allow_task_code: bool) -> TaskFiles:
    """The files of the task YAML at `path`, whose `task:` must be `name`; UserInputError names the problem."""
    folder = Path(path).parent.resolve()
    path = folder / Path(path).name
    document, functions, yamls = _read_task(path, folder, allow_task_code)
    if document.get("task") != name:
        raise UserInputError(f"'{path}' defines task {document.get('task')!r}, not {name!r} (fix: make the "
                             "recipe's task name and the YAML's `task:` the same)")
    files = list(yamls)
    for function in functions:
        module = folder / (function.rpartition(".")[0].replace(".", "/") + ".py")
        if not _inside(module, folder) or not module.is_file():
            raise UserInputError(f"'{path}': !function {function} names a module that is not a file beside the task "
                                 "YAML; kiln runs only task code it can put in the cache key (fix: copy the module "
                                 "next to the YAML)")
    if functions:   # the function modules and the modules they may import from beside them
        files += sorted(folder.glob("*.py"))
    data = (document.get("dataset_kwargs") or {}).get("data_files") or {}
    for rel in _data_files(data):
        files.append(_under(folder, rel))
    checked = []
    for file in dict.fromkeys(files):
        limit = DATA_FILE_BYTES if file.suffix not in (".yaml", ".yml", ".py") else TASK_FILE_BYTES
        _check_file(file, folder, limit, path)
        checked.append(file)
    return TaskFiles(folder, path, tuple(checked), tuple(functions), bool(document.get("unsafe_code")))


def _data_files(data) -> list[str]:
    values = [data] if isinstance(data, str) else list(data.values()) if isinstance(data, dict) else list(data)
    return [one for value in values for one in ([value] if isinstance(value, str) else value)]


def _under(base: Path, rel: str) -> Path:
    """`rel` from `base`, '..' folded lexically (where it leads is checked on the real path: _inside)."""
    return Path(os.path.normpath(base / rel))


def _inside(path: Path, folder: Path) -> bool:
    full = Path(os.path.realpath(path))
    return full == folder or folder in full.parents


def _check_file(path: Path, folder: Path, limit: int, task: Path) -> None:
    shown = f"'{task}'" if path == task else f"'{task}' reads '{path}', which"
    if not _inside(path, folder):
        raise UserInputError(f"{shown} is outside the task YAML's folder {folder} (fix: keep a task's YAMLs, "
                             "modules and data in its folder)")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserInputError(f"{shown} does not exist (fix: point it at an lm-eval task YAML whose files are "
                             "local)") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserInputError(f"{shown} is not a regular file (a FIFO, device or folder is never read) (fix: use a "
                             "regular file)")
    if info.st_size > limit:
        raise UserInputError(f"{shown} has {info.st_size} bytes, more than kiln reads for a task ({limit >> 20} MiB) "
                             "(fix: a smaller file, or fewer documents)")


class _TaskLoader(yaml.SafeLoader):
    """lm-eval's YAML without running anything: `!function x.y` becomes a marker, aliases are refused."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: uses the YAML alias *{event.anchor}, which kiln "
                                 "does not expand in task configs (fix: write the value out)")
        return super().compose_node(parent, index)


class _Function(str):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _read_task(path: Path, folder: Path, allow_task_code: bool, root: Path | None = None,
               depth: int = 0) -> tuple[dict, list[str], list[Path]]:
    """The merged document (includes first, local keys win), its `!function` references and the YAMLs read."""
    _check_file(path, folder, TASK_FILE_BYTES, root or path)
    try:
        with open(path, "rb") as handle:   # a regular file of bounded size (checked above)
            document = yaml.load(handle.read(TASK_FILE_BYTES + 1).decode("utf-8"), Loader=_TaskLoader)
    except RecursionError:
        raise UserInputError(f"'{path}' nests too deep to be a task config") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserInputError(f"'{path}' is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise UserInputError(f"'{path}' is not an lm-eval task (a mapping with `task:`)")
    functions = sorted({value for value in _leaves(document) if isinstance(value, _Function)})
    if functions and not allow_task_code:
        raise UserInputError(f"'{path}' runs Python from its YAML (!function {', '.join(functions)}); kiln runs "
                             "task code only when the recipe sets evaluation.allow_task_code: true (fix: set it, if "
                             "you trust this code, or remove the !function entries)")
    yamls = [path]
    includes = document.pop("include", None)
    if includes is None:
        return document, functions, yamls
    if depth >= _MAX_INCLUDES:
        raise UserInputError(f"'{path}': includes nest deeper than {_MAX_INCLUDES} (fix: a cycle of includes?)")
    merged = {}
    for include in includes if isinstance(includes, list) else [includes]:
        if not isinstance(include, str):
            raise UserInputError(f"'{path}': include {include!r} is not a file name")
        sub, sub_functions, sub_yamls = _read_task(_under(path.parent, include), folder, allow_task_code,
                                                     root or path, depth + 1)
        sub.pop("task_list", None)
        merged.update(sub)
        functions = sorted(set(functions) | set(sub_functions))
        yamls += sub_yamls
    merged.update(document)
    return merged, functions, yamls


def _leaves(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value
