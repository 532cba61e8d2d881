"""`kiln plan --launcher slurm|kubernetes` (issue 41): the files that run calibration.nodes on a cluster, checked by
the tools themselves. No cluster is reachable here, so the sbatch script goes through Slurm's own dry run
(`sbatch --test-only`) against a real controller with two real node daemons on this host (Debian's slurmctld and
slurmd, munge for their authentication); the Kubernetes documents through the API's OpenAPI schemas
(kubernetes-validate, strict: unknown fields refused) and the links between them that the schemas cannot see.
The kiln commands the files run are tested by tests/test_distributed.py (two nodes on this host)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.recipes import run_kiln, write_recipe

SLURM = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol")


def _recipe(tmp_path: Path, test_model: Path, device: str, nodes: int = 2) -> Path:
    calibration = {"builtin": "python-docs-train", "samples": 16, "seq_len": 64, "processes": 2, "nodes": nodes,
                   "device": device}
    return write_recipe(tmp_path, str(test_model), {"fp8": {"quant": "fp8", "kv_cache": "fp8"}}, name="nodes-demo",
                        calibration=calibration)


def _launcher(tmp_path: Path, recipe: Path, kind: str, *extra: str) -> str:
    result = run_kiln("plan", recipe, "--launcher", kind, *extra, env={"KILN_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    return result.stdout


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A Slurm controller and two node daemons (node0, node1: 2 CPUs, 2 GPUs each) on this host; yields the
    environment that points Slurm's commands at them."""
    missing = [tool for tool in SLURM if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if missing or os.geteuid() != 0:
        pytest.skip(f"Slurm's daemons need root and Debian's slurmctld, slurmd, slurm-client and munge (missing: "
                    f"{', '.join(missing) or 'root'}; .ci/run installs them)")
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir()
    subprocess.run(["mungekey", "-c", "-k", str(root / "munge.key")], check=True, capture_output=True)
    (root / "munge.key").chmod(0o400)
    subprocess.run(["munged", f"--key-file={root}/munge.key", f"--socket={root}/munge.sock",
                    f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/seed",
                    "--force"], check=True, capture_output=True)
    controller, node0, node1 = _free_ports(3)
    nodes = "CPUs=2 RealMemory=8000 Gres=gpu:2 State=UNKNOWN"
    (root / "slurm.conf").write_text(f"""ClusterName=kiln
SlurmctldHost=localhost
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort={controller}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
GresTypes=gpu
ReturnToService=2
NodeName=node0 NodeAddr=127.0.0.1 Port={node0} {nodes}
NodeName=node1 NodeAddr=127.0.0.1 Port={node1} {nodes}
PartitionName=main Nodes=node[0-1] Default=YES MaxTime=INFINITE State=UP
""")
    # Two GPUs a node as Slurm counts them: any two device files do for scheduling.
    (root / "gres.conf").write_text("NodeName=node[0-1] Name=gpu File=/dev/null\nNodeName=node[0-1] Name=gpu "
                                    "File=/dev/zero\n")
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    subprocess.run(["slurmctld", "-f", str(root / "slurm.conf")], check=True, env=env)
    for node in ("node0", "node1"):
        subprocess.run(["slurmd", "-N", node, "-f", str(root / "slurm.conf")], check=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.split()
        if state == ["idle"]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the Slurm nodes did not come up: {(root / 'slurmctld.log').read_text()[-2000:]}")
    try:
        yield env
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
        for pid_file in root.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text().split()[0]), 15)
            except (OSError, ValueError):
                pass


@pytest.mark.parametrize("device, gpus", [("cpu", None), ("cuda", 2)])
def test_the_sbatch_script_passes_slurms_dry_run_and_finds_node_0(tmp_path, test_model, slurm, device, gpus):
    script = _launcher(tmp_path, _recipe(tmp_path, test_model, device), "slurm")
    path = tmp_path / "calibrate.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=2" in directives and "#SBATCH --ntasks-per-node=1" in directives
    assert ("#SBATCH --gpus-per-node=2" in directives) == (gpus == 2)
    dry = subprocess.run(["sbatch", "--test-only", str(path)], env={**slurm, "KILN_HOME": str(tmp_path / "home")},
                         capture_output=True, text=True)
    assert dry.returncode == 0 and "to start at" in dry.stderr and "on nodes node[0-1]" in dry.stderr, dry.stderr
    # Each node's kiln: the quantize stage alone, numbered by Slurm; then node 0 (the batch step) builds the rest.
    lines = script.strip().splitlines()
    assert f"recipe={tmp_path / 'nodes-demo.yaml'}" in lines
    assert "KILN_NODE_RANK=$SLURM_NODEID exec \"${KILN:-kiln}\" build --stage quantize \"$1\"' kiln-node \"$recipe\"" \
        in script
    assert lines[-1] == '"${KILN:-kiln}" build "$recipe"'
    rendezvous = next(line for line in script.splitlines() if line.startswith("export KILN_RENDEZVOUS="))
    found = subprocess.run(["bash", "-c", f"{rendezvous}; echo $KILN_RENDEZVOUS"], capture_output=True, text=True,
                           env={**slurm, "SLURM_JOB_NODELIST": "node[0-1]"})
    assert found.stdout.strip() == "node0:29500", found.stderr


def test_slurms_dry_run_refuses_what_the_cluster_cannot_hold(tmp_path, test_model, slurm):
    """The check can fail: three nodes on a two-node cluster are refused by Slurm itself."""
    path = tmp_path / "three.sbatch"
    path.write_text(_launcher(tmp_path, _recipe(tmp_path, test_model, "cpu", nodes=3), "slurm"))
    dry = subprocess.run(["sbatch", "--test-only", str(path)], env=slurm, capture_output=True, text=True)
    assert dry.returncode != 0 and "Requested node configuration is not available" in dry.stderr, dry.stderr


def test_the_kubernetes_documents_pass_the_api_schemas_and_name_each_other(tmp_path, test_model):
    import kubernetes_validate

    recipe = _recipe(tmp_path, test_model, "cuda")
    text = _launcher(tmp_path, recipe, "kubernetes", "--image", "registry.example/kiln:1", "--claim", "shared-home")
    documents = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in documents] == ["ConfigMap", "Service", "Job"]
    for document in documents:
        kubernetes_validate.validate(document, "1.34.0", strict=True)   # raises on an unknown field or a wrong type
    config_map, service, job = documents
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2 and job["spec"]["backoffLimit"] == 0
    # Pods are reachable as <job>-<index>.<service>: the headless Service selects the Job's pods by the label
    # Kubernetes gives them, and node 0 (index 0) is the rendezvous.
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert env["KILN_RENDEZVOUS"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}:29500"
    assert env["KILN_HOME"] == next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "kiln-home")
    assert {"name": "kiln-home", "persistentVolumeClaim": {"claimName": "shared-home"}} in pod["volumes"]
    assert container["image"] == "registry.example/kiln:1"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert "KILN_NODE_RANK=$JOB_COMPLETION_INDEX kiln build --stage quantize /etc/kiln/nodes-demo.yaml" in \
        container["command"][-1]
    assert config_map["data"] == {"nodes-demo.yaml": recipe.read_text()}
    # The check can fail: a field the API does not have is refused.
    container["evn"] = container.pop("env")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.34.0", strict=True)


def test_an_unknown_launcher_is_refused_in_one_line(tmp_path, test_model):
    result = run_kiln("plan", _recipe(tmp_path, test_model, "cpu"), "--launcher", "pbs",
                      env={"KILN_HOME": str(tmp_path / "home")})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("kiln: --launcher pbs: kiln writes slurm and kubernetes files (fix: --launcher "
                                     "slurm or --launcher kubernetes)")
