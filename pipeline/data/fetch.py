"""Fetch: turn a recipe's model source into a local folder and a content digest.

hf:// sources go through `huggingface_hub.snapshot_download` at the pinned
commit, so HF_HOME, HF_HUB_OFFLINE and HF_TOKEN behave as everywhere else
(the token is read by huggingface_hub itself; kiln never logs or writes it).
Only safetensors weights are fetched and loaded unless the recipe opts in to
pickle weights, which can run code when loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.common.digest import canonical_digest, tree_digest
from kiln.common.errors import KilnError, UserInputError
from kiln.pipeline.recipe.schema import ModelSource

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
ALWAYS_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*")
REMOTE_CODE_PATTERNS = ("*.py",)


@dataclass(frozen=True)
class FetchedModel:
    path: Path
    digest: str


# What transformers loads; any other *.safetensors (an adapter, a projector) is not the model's weights.
MODEL_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")


def _has_safetensors(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MODEL_SAFETENSORS)


def _pickle_files(folder: Path) -> list[str]:
    return sorted({p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)})


def _refuse_pickle_only(folder: Path, source: ModelSource, where: str) -> None:
    if _has_safetensors(folder):
        return
    pickles = _pickle_files(folder)
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    beside = f" ({', '.join(others[:3])} {'is' if len(others) == 1 else 'are'} not model weights: transformers " \
             "loads model.safetensors or model.safetensors.index.json)" if others else ""
    if pickles and not source.allow_pickle:
        raise UserInputError(
            f"model.source: {where} has only pickle weights ({', '.join(pickles[:3])}){beside}, which can run code "
            "when loaded (fix: use a safetensors revision, or set model.allow_pickle: true if you trust it)"
        )
    if not pickles:
        raise UserInputError(f"model.source: {where} has no model.safetensors weights{beside} "
                             "(fix: point it at a model folder)")


def local_model(source: ModelSource, folder: Path) -> FetchedModel:
    if not folder.is_dir():
        raise UserInputError(f"model.source: '{folder}' is not a folder (fix: give a model folder or hf://org/name)")
    if not (folder / "config.json").is_file():
        raise UserInputError(f"model.source: '{folder}' has no config.json (fix: point it at a Hugging Face model folder)")
    _refuse_pickle_only(folder, source, str(folder))
    refuse_outside_links(folder)
    return FetchedModel(folder, tree_digest(folder))


def refuse_outside_links(folder: Path) -> None:
    """A link inside a model folder must stay inside it: kiln reads, digests and publishes what the links
    point to (a chat_template.jinja -> /etc/shadow would be published). Hub snapshots are links into the
    repo's own blob store (snapshots/<rev>/f -> ../../blobs/<sha>), which is allowed."""
    import os

    root = Path(folder).resolve()
    hub_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    for directory, dirs, files in os.walk(folder):   # does not descend into linked folders
        for name in sorted(dirs + files):
            path = Path(directory) / name
            if not path.is_symlink():
                continue
            target = path.resolve()
            if target.is_relative_to(root) or (hub_blobs is not None and target.is_relative_to(hub_blobs)):
                continue
            raise UserInputError(f"model.source: {path} links to {target}, outside the model folder (fix: copy the "
                                 "file into the folder; kiln publishes what a model folder holds, never what it "
                                 "points to)")


def hub_digest(source: ModelSource) -> str:
    """A pinned commit fixes the content; the digest also records what kiln lets through."""
    return canonical_digest({"repo": source.repo_id, "revision": source.revision, "allow_pickle": source.allow_pickle,
                             "trust_remote_code": source.trust_remote_code})


def _allow_patterns(source: ModelSource) -> list[str]:
    patterns = list(ALWAYS_PATTERNS)
    if source.allow_pickle:
        patterns += PICKLE_PATTERNS
    if source.trust_remote_code:
        patterns += REMOTE_CODE_PATTERNS
    return patterns


def cached_hub_config(source: ModelSource) -> Path | None:
    """config.json of the pinned revision if the local HF cache has it (plan-time checks never wait on the network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.repo_id, "config.json", revision=source.revision)
    return Path(found) if isinstance(found, str) else None


def hub_model(source: ModelSource, local_only: bool = False) -> FetchedModel:
    """Download (or find in the HF cache) the pinned snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{source.source}@{source.revision[:12]}"
    try:
        folder = snapshot_download(
            repo_id=source.repo_id,
            revision=source.revision,
            allow_patterns=_allow_patterns(source),
            local_files_only=local_only,
        )
    except GatedRepoError:
        raise KilnError(f"model.source: {where} is gated (fix: accept its licence on the hub and set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise UserInputError(f"model.source: {source.source} not found on the hub (fix: check the name; private repos need HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserInputError(f"model.revision: {source.revision} is not a commit of {source.source} (fix: copy the full commit hash)") from None
    except LocalEntryNotFoundError:
        raise KilnError(
            f"model.source: {where} is not in the local Hugging Face cache and the hub cannot be reached "
            "(fix: run once with network, or unset HF_HUB_OFFLINE)"
        ) from None
    folder = Path(folder)
    if local_only and not _has_safetensors(folder) and not _pickle_files(folder):
        # A partial snapshot (config.json alone, say): not an error, just not fetched yet.
        raise KilnError(f"model.source: {where} is only partly in the local Hugging Face cache")
    _refuse_pickle_only(folder, source, where)
    refuse_outside_links(folder)
    return FetchedModel(folder, hub_digest(source))


def probe_hub_cache(source: ModelSource) -> tuple[Path | None, bool]:
    """(folder for plan-time checks, whether the pinned snapshot is fully in the HF cache).

    The folder is the cached snapshot, or the one holding a cached config.json alone,
    or None; the network is never asked. Refusals (pickle-only weights) propagate.
    """
    try:
        return hub_model(source, local_only=True).path, True
    except UserInputError:
        raise
    except KilnError:
        config = cached_hub_config(source)  # config.json alone is enough for the width check
        return (config.parent if config else None), False


def checkable_model_folder(source: ModelSource, resolve: Callable[[str], Path]) -> Path | None:
    """A local folder with the model's config.json (and weights, if present) for plan-time checks.

    Local sources (`resolve`d from the recipe's folder) always have one; hub sources only when the HF cache
    does. Otherwise the runner checks right after fetching, before any stage runs.
    """
    if not source.is_hub:
        return local_model(source, resolve(source.source)).path
    return probe_hub_cache(source)[0]
