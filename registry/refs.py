"""How people name a registry version (NAME@ALIAS, NAME/VERSION) and the one way kiln looks one up in MLflow."""

from __future__ import annotations

import re

from kiln.common.errors import UserInputError
from kiln.registry.store import is_missing

MAX_VERSION = 2**31 - 1   # MLflow stores version numbers as a 32-bit integer column (PostgreSQL's `integer`)
_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]*)(?:@(?P<alias>[a-z0-9][a-z0-9._-]*)|/(?P<version>\d+))$")


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    match = _REF.match(ref)
    if not match:
        raise UserInputError(f"'{ref}' is not NAME@ALIAS or NAME/VERSION (fix: e.g. demo-fp8@candidate or demo-fp8/3)")
    return match["name"], match["alias"], match["version"]


def checked_version(name: str, version: str) -> str:
    """A version number a registry can hold, or one line: past 64 bits MLflow raised an overflow traceback."""
    if not version.isascii() or not version.isdigit() or not 1 <= int(version) <= MAX_VERSION:
        raise UserInputError(f"{name}/{version}: a version is a whole number from 1 to {MAX_VERSION} (fix: see "
                             "`kiln ls` for the versions there are)")
    return str(int(version))


def stored_version(mlflow, name: str, alias: str | None = None, version: str | None = None):
    """The MLflow model version `name@alias` or `name/version` names; one line when there is none."""
    if version is not None:
        version = checked_version(name, version)
    try:
        if alias:
            return mlflow.get_model_version_by_alias(name, alias)
        return mlflow.get_model_version(name, version)
    except Exception as exc:   # MlflowException: a missing one is the user's; anything else propagates
        if not is_missing(exc):
            raise
        what, ref = (f"alias '{alias}'", f"{name}@{alias}") if alias else (f"version {version}", f"{name}/{version}")
        raise UserInputError(f"{ref}: registered model '{name}' has no {what} (fix: see `kiln ls`)") from None


def resolve(mlflow, ref: str):
    """The version a NAME@ALIAS or NAME/VERSION reference names."""
    return stored_version(mlflow, *parse_ref(ref))
