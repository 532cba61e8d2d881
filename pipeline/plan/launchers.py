"""What runs a recipe's calibration across nodes on a cluster: `kiln plan RECIPE --launcher slurm|kubernetes`.

Each node runs `kiln build --stage quantize` with KILN_NODE_RANK (0..nodes-1) and KILN_RENDEZVOUS (node 0's
host:port) set, against one KILN_HOME they all mount (quantize/distributed.py); node 0 then runs `kiln build`, which
finds the checkpoint in the cache and validates and publishes it. How each scheduler numbers its nodes and names the
first one is the whole difference between the two files:

- Slurm: an sbatch script. `srun` starts one kiln a node; SLURM_NODEID numbers them and the first host of
  SLURM_JOB_NODELIST is node 0. The batch step itself runs on node 0.
- Kubernetes: an indexed Job (one pod a node, JOB_COMPLETION_INDEX numbering them) whose pods are named by a headless
  Service, so node 0 is `<job>-0.<service>`; the recipe travels as a ConfigMap, KILN_HOME is a ReadWriteMany claim.

Public: LAUNCHERS (kind -> render(LaunchSpec) -> text), launch_spec(plan, image, claim).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RENDEZVOUS_PORT = 29500   # torchrun's customary port
GIB = 1 << 30


@dataclass(frozen=True)
class LaunchSpec:
    """What a launcher file needs to know of the recipe and its plan."""

    recipe_name: str
    recipe_path: Path            # absolute: the file every node reads (Slurm), or the text a ConfigMap carries
    recipe_text: str
    nodes: int
    processes: int               # ranks a node
    gpus_per_node: int           # 0 when calibration.device is cpu
    memory_gib: int | None       # a node's estimated peak host memory x 1.25, rounded up (None: no config.json)
    image: str = "kiln:latest"
    claim: str = "kiln-home"

    @property
    def job_name(self) -> str:
        """A DNS label (Kubernetes object and pod names, Slurm's job name): kiln-<recipe>, lower case."""
        return ("kiln-" + re.sub(r"[^a-z0-9-]+", "-", self.recipe_name.lower())).strip("-")[:52]


def launch_spec(plan, image: str, claim: str) -> LaunchSpec:
    """The spec of a plan whose recipe calibrates across nodes (or one node's processes)."""
    from kiln.quantize import Device

    recipe = plan.loaded.recipe
    calibration = recipe.calibration
    memory = plan.memory()
    # Node 0 runs every stage (its ranks' calibration, the export, then validation): the largest host peak of them.
    peak = max(s.host_bytes for s in memory.stages) if memory is not None else None
    return LaunchSpec(recipe.name, Path(plan.loaded.path).resolve(), Path(plan.loaded.path).read_text(),
                      calibration.nodes, calibration.processes,
                      0 if calibration.device is Device.cpu else calibration.processes,
                      None if peak is None else -(-int(peak * 1.25) // GIB), image, claim)


def _slurm(spec: LaunchSpec) -> str:
    gpus = f"#SBATCH --gpus-per-node={spec.gpus_per_node}\n" if spec.gpus_per_node else ""
    memory = f"#SBATCH --mem={spec.memory_gib}G\n" if spec.memory_gib else ""
    recipe = shlex.quote(str(spec.recipe_path))
    return f"""#!/bin/bash
# Written by `kiln plan {spec.recipe_path.name} --launcher slurm`: recipe {spec.recipe_name} calibrated on
# {spec.nodes} nodes x {spec.processes} ranks, then validated and published from node 0. Submit it with `sbatch FILE`
# from a shell whose KILN_HOME is a folder every node mounts; the recipe, and any local model folder or data file it
# names, must be on storage every node sees.
#SBATCH --job-name={spec.job_name}
#SBATCH --nodes={spec.nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
{gpus}{memory}#SBATCH --output={spec.job_name}-%j.out
set -euo pipefail
: "${{KILN_HOME:?set KILN_HOME to a folder every node mounts}}"
export KILN_HOME
recipe={recipe}
# Node 0 is the first host of the allocation: its rank 0 writes the checkpoint into KILN_HOME's cache.
export KILN_RENDEZVOUS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):{RENDEZVOUS_PORT}"
srun --nodes={spec.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\
    bash -c 'KILN_NODE_RANK=$SLURM_NODEID exec "${{KILN:-kiln}}" build --stage quantize "$1"' kiln-node "$recipe"
# This step runs on node 0: the checkpoint is cached, so it validates and publishes.
"${{KILN:-kiln}}" build "$recipe"
"""


def _kubernetes(spec: LaunchSpec) -> str:
    """Three documents: the recipe's ConfigMap, the headless Service naming the pods, the indexed Job."""
    name, service = spec.job_name, f"{spec.job_name}-nodes"
    labels = {"app.kubernetes.io/name": "kiln", "app.kubernetes.io/instance": name}
    recipe_file = f"/etc/kiln/{spec.recipe_path.name}"
    script = (f"KILN_NODE_RANK=$JOB_COMPLETION_INDEX kiln build --stage quantize {recipe_file} && "
              f"if [ \"$JOB_COMPLETION_INDEX\" = 0 ]; then kiln build {recipe_file}; fi")
    resources: dict = {}
    if spec.memory_gib:
        resources["requests"] = {"memory": f"{spec.memory_gib}Gi"}
    if spec.gpus_per_node:
        resources["limits"] = {"nvidia.com/gpu": spec.gpus_per_node}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-recipe", "labels": labels},
                  "data": {spec.recipe_path.name: spec.recipe_text}}
    headless = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": service, "labels": labels},
                "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                         "selector": {"batch.kubernetes.io/job-name": name},
                         "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}]}}
    container = {
        "name": "kiln", "image": spec.image, "command": ["bash", "-c", script],
        "env": [{"name": "KILN_HOME", "value": "/kiln-home"},
                {"name": "KILN_RENDEZVOUS", "value": f"{name}-0.{service}:{RENDEZVOUS_PORT}"}],
        "ports": [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}],
        "volumeMounts": [{"name": "kiln-home", "mountPath": "/kiln-home"},
                         {"name": "recipe", "mountPath": "/etc/kiln", "readOnly": True}],
        **({"resources": resources} if resources else {}),
    }
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels}, "spec": {
        "completionMode": "Indexed", "completions": spec.nodes, "parallelism": spec.nodes,
        "backoffLimit": 0,   # a node that fails fails the build (kiln's one line is in its log); rerun resumes
        "template": {"metadata": {"labels": labels}, "spec": {
            "subdomain": service, "restartPolicy": "Never", "containers": [container],
            "volumes": [{"name": "kiln-home", "persistentVolumeClaim": {"claimName": spec.claim}},
                        {"name": "recipe", "configMap": {"name": f"{name}-recipe"}}]}}}}
    header = (f"# Written by `kiln plan {spec.recipe_path.name} --launcher kubernetes`: recipe {spec.recipe_name} "
              f"calibrated on\n# {spec.nodes} pods x {spec.processes} ranks, then validated and published from pod 0. "
              f"Apply it with `kubectl apply -f FILE`.\n# The claim {spec.claim} must be ReadWriteMany (every pod's "
              "KILN_HOME) and hold any local model folder or data file\n# the recipe names, at the path it names; "
              "the image needs kiln installed.\n")
    return header + "---\n".join(_yaml(document) for document in (config_map, headless, job))


def _yaml(document: dict) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:   # the labels repeat as written, not as &anchors
            return True

    def text(dumper, value: str):   # the recipe as a block, as it reads in its file
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump(document, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=120)


LAUNCHERS: dict[str, Callable[[LaunchSpec], str]] = {"slurm": _slurm, "kubernetes": _kubernetes}

