"""`kiln doctor`: what this host can build, as one JSON document and as tables."""

from __future__ import annotations

from rich.table import Table

from kiln.compile import ARCHS, Host, Target


def doctor_document(host: Host, recipes) -> dict:
    sms = [sm for sm in host.sms if sm in ARCHS] or []
    targets = []
    for target in Target:
        for sm in sms or [None]:
            problem = host.compile_problem(sm, target) if sm else "needs an NVIDIA GPU (none found)"
            targets.append({"target": target.value, "sm": sm, "can_build": problem is None, "reason": problem})
    variants = []
    for loaded in recipes:
        build = loaded.recipe.build
        for name, variant in loaded.recipe.variants.items():
            for sm in variant.sms:
                problem = host.compile_problem(sm, build.target, build.tp_size)
                variants.append({"recipe": str(loaded.path), "variant": name, "sm": sm, "target": build.target.value,
                                 "can_build": problem is None, "reason": problem})
    return {"host": host.as_dict(), "targets": targets, "recipes": variants, "interpreters": _interpreters()}


def _interpreters() -> dict[str, dict]:
    """The tools kiln runs in interpreters of their own: where each is and its version ("absent"): the
    llm-compressor backend, then each serving stack that has one (its `interpreter()`)."""
    from kiln.common.foreign_python import LLMCOMPRESSOR_PYTHON_ENV, tool_python
    from kiln.common.versions import installed_versions
    from kiln.serve import STACKS

    llmc = tool_python(LLMCOMPRESSOR_PYTHON_ENV)
    found = {"llm-compressor": {"python": llmc, "env": LLMCOMPRESSOR_PYTHON_ENV,
                                "version": installed_versions(("llmcompressor",), llmc)["llmcompressor"]}}
    for row in STACKS.values():
        line = row.load().interpreter()
        if line is not None:
            found[line[0]] = line[1]
    return found


def doctor_tables(document: dict) -> list[Table]:
    host = document["host"]
    gpus = Table(title=f"GPUs (found through {host['probe']})", title_justify="left")
    for column in ("index", "name", "sm", "memory MiB", "in kiln's GPU table"):
        gpus.add_column(column)
    for gpu in host["gpus"]:
        gpus.add_row(str(gpu["index"]), gpu["name"], gpu["sm"], str(gpu["memory_mib"] or "-"),
                     "yes" if gpu["sm"] in ARCHS else "no")
    if not host["gpus"]:
        gpus.add_row("-", "no NVIDIA GPU found", "-", "-", "-")

    tools = Table(title="tools", title_justify="left")
    tools.add_column("tool")
    tools.add_column("version")
    for label, key in (("CUDA driver", "cuda_driver"), ("TensorRT", "tensorrt"), ("TensorRT-LLM", "tensorrt_llm"),
                       ("ModelOpt", "modelopt")):
        tools.add_row(label, host[key] or "not installed")
    for label, found in document.get("interpreters", {}).items():
        version = found["version"].replace("cpu:", "") + (" (CPU build)" if found["version"].startswith("cpu:") else "")
        version = version if found["version"] != "absent" else f"not installed (set {found['env']})"
        tools.add_row(f"{label} ({found['python']})", version)

    targets = Table(title="what this host can compile", title_justify="left")
    for column in ("target", "sm", "can build"):
        targets.add_column(column)
    for row in document["targets"]:
        targets.add_row(row["target"], row["sm"] or "-", "yes" if row["can_build"] else f"no: {row['reason']}")
    tables = [gpus, tools, targets]

    if document["recipes"]:
        variants = Table(title="recipe variants", title_justify="left")
        for column in ("recipe", "variant", "sm", "target", "can build here"):
            variants.add_column(column)
        for row in document["recipes"]:
            variants.add_row(row["recipe"], row["variant"], row["sm"], row["target"],
                             "yes" if row["can_build"] else f"no: {row['reason']}")
        tables.append(variants)
    if host["notes"]:
        notes = Table(title="notes", title_justify="left", show_header=False)
        notes.add_column("note")
        for note in host["notes"]:
            notes.add_row(note)
        tables.append(notes)
    return tables
