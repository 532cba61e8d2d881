"""Calibration across processes (issue 41): the quantize stage under torchrun, with the backend's own data-parallel sync.

`calibration.processes: N` starts N ranks with torch's elastic launcher (`python -m torch.distributed.run
--standalone`: the rendezvous on this host). Each rank loads the source model and calibrates on its share of the
calibration windows (contiguous, `torch.tensor_split`). ModelOpt 0.47 reduces what calibration measured across the
ranks itself whenever torch.distributed is initialized: max calibration all-reduces every quantizer's amax with MAX
(`TensorQuantizer.sync_amax_across_distributed_group`), AWQ-lite averages its activation scales across ranks. Rank 0
then exports and writes kiln.json; the others exit. A max-calibrated format comes out byte for byte as one process
makes it: the largest of the ranks' maxima is the maximum over every window (tests/test_distributed.py).

With `calibration.nodes: M`, each of M hosts runs the quantize stage (`kiln build --stage quantize`) with
KILN_NODE_RANK (0..M-1) and KILN_RENDEZVOUS (node 0's host:port) set, as `kiln plan --launcher` writes them; torchrun
meets the other nodes there (its static rendezvous: node 0 holds rank 0, which writes), within
KILN_RENDEZVOUS_TIMEOUT_S. A node other than 0 calibrates its share and writes nothing: `run` returns None there.

The launcher runs with --max-restarts 0: a rank that dies ends the group (torchrun stops the others at its next
monitor tick), and `run` raises one line naming the rank and how it ended. The stage's output folder is a temporary
one until the stage succeeds, so nothing reaches the cache.

Public: run(request, model_dir, calibration, out_dir, progress, placement) -> CheckpointRecord | None (ModelOpt's
ranks), launch(...) (any backend's ranks under torchrun: llm-compressor's are quantize/llmcompressor_worker.py), Node
(which host this is), RankGroup (what modelopt_backend asks of the rank it runs in), CalibrationRankError.
Run as `python -m kiln.quantize.distributed JOB_DIR`, this module is one rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.common.errors import KilnError, UserInputError
from kiln.quantize.checkpoint import AutoRequest, CheckpointRecord, QuantizeRequest
from kiln.quantize.formats import AUTO, Backend, KVCacheFormat, QuantFormat
from kiln.quantize.placement import Placement, VisibleGpu

JOB = "job.json"
CALIBRATION = "calibration.pt"
PROGRESS = "kiln-progress "     # rank 0's stdout lines the launching process turns into progress
MONITOR_INTERVAL_S = 1          # how often torchrun looks for a dead rank (its default is 0.1-5 s by version)
NODE_RANK, RENDEZVOUS, RENDEZVOUS_TIMEOUT = "KILN_NODE_RANK", "KILN_RENDEZVOUS", "KILN_RENDEZVOUS_TIMEOUT_S"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 900   # nodes a scheduler starts minutes apart (pods pulling an image) still meet


@dataclass(frozen=True)
class Node:
    """This host among the `count` that calibrate together; `endpoint`: node 0's host:port (None on one host)."""

    rank: int = 0
    count: int = 1
    endpoint: str | None = None
    timeout_s: int = DEFAULT_RENDEZVOUS_TIMEOUT_S

    @classmethod
    def from_environment(cls, nodes: int) -> "Node":
        """Where `nodes` > 1, from KILN_NODE_RANK and KILN_RENDEZVOUS; one line naming the fix when they are wrong."""
        if nodes == 1:
            return cls()
        fix = (f"(fix: run `kiln build --stage quantize` on each of the {nodes} nodes with {NODE_RANK}=0..{nodes - 1} "
               f"and {RENDEZVOUS}=<node 0's host>:<port>, as the files of `kiln plan --launcher slurm|kubernetes` do)")
        rank, endpoint = os.environ.get(NODE_RANK), os.environ.get(RENDEZVOUS)
        if rank is None or not endpoint:
            missing = " and ".join(name for name, value in ((NODE_RANK, rank), (RENDEZVOUS, endpoint)) if not value)
            raise UserInputError(f"calibration.nodes: {nodes}: {missing} not set on this host {fix}")
        if not rank.isdigit() or int(rank) >= nodes:
            raise UserInputError(f"{NODE_RANK}={rank}: not a node of calibration.nodes: {nodes} {fix}")
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserInputError(f"{RENDEZVOUS}={endpoint}: not <host>:<port> {fix}")
        timeout = os.environ.get(RENDEZVOUS_TIMEOUT, str(DEFAULT_RENDEZVOUS_TIMEOUT_S))
        if not timeout.isdigit() or int(timeout) == 0:
            raise UserInputError(f"{RENDEZVOUS_TIMEOUT}={timeout}: not a whole number of seconds (fix: unset it, "
                                 f"for {DEFAULT_RENDEZVOUS_TIMEOUT_S})")
        return cls(int(rank), nodes, endpoint, int(timeout))

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def launcher_arguments(self, processes: int) -> list[str]:
        """torchrun's: the standalone rendezvous on one host, the static one at node 0 across hosts (node ranks
        as given, so global rank 0, which writes, is on node 0)."""
        if self.count == 1:
            return ["--standalone", f"--nproc-per-node={processes}"]
        host, _, port = self.endpoint.rpartition(":")
        return [f"--nnodes={self.count}", f"--node-rank={self.rank}", f"--master-addr={host}",
                f"--master-port={port}", f"--rdzv-conf=timeout={self.timeout_s}", f"--nproc-per-node={processes}"]


class CalibrationRankError(KilnError):
    """A rank died or failed: one line, the rank and how it ended."""


@dataclass(frozen=True)
class RankGroup:
    """The rank this process is, as modelopt_backend needs it: its share of the windows, who writes, the sums."""

    rank: int
    world: int
    backend: str    # gloo | nccl

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def share(self, calibration):
        """This rank's contiguous share of the windows ([n, seq_len]); every rank gets at least one (kiln check)."""
        import torch

        return torch.tensor_split(calibration, self.world)[self.rank]

    @contextlib.contextmanager
    def gptq_hessians_shared(self):
        """While calibration runs: each GPTQ layer's Hessian summed over the ranks before its weights are updated.

        ModelOpt 0.47 syncs amax across data-parallel ranks but not GPTQ's Hessians, so each rank would update its
        weights from its own windows only (measured on the test model: 40 % of a layer's INT4 codes differed from
        one process's). A rank's Hessian is the mean of 2 x x^T over its n tokens; n-weighted, the ranks' means make
        the mean over every token, as one process computes it (up to float summation order)."""
        import torch
        import torch.distributed as dist
        from modelopt.torch.quantization.utils.calib_utils import GPTQHelper

        own = GPTQHelper.update_weights

        def update_weights(helper, block_size, perc_damp):
            tokens = torch.tensor([float(helper.n_samples)], device=helper.hessian.device)
            summed = helper.hessian * helper.n_samples
            dist.all_reduce(summed)
            dist.all_reduce(tokens)
            if tokens.item() > 0:
                helper.hessian, helper.n_samples = summed / tokens, int(tokens.item())
            return own(helper, block_size, perc_damp)

        GPTQHelper.update_weights = update_weights
        try:
            yield
        finally:
            GPTQHelper.update_weights = own

    def leave(self, expert_tokens: dict[str, list[int]]) -> dict[str, list[int]]:
        """After calibration: the MoE tokens per expert summed over the ranks (the checks see every window's), then
        the group is dissolved. ModelOpt's export runs collectives of its own whenever torch.distributed is up (rank 0
        alone exports, so they would wait on ranks that have left)."""
        import torch.distributed as dist

        tables: list = [None] * self.world
        dist.all_gather_object(tables, expert_tokens)
        dist.destroy_process_group()
        return {block: [sum(t[block][i] for t in tables) for i in range(len(counts))]
                for block, counts in expert_tokens.items()}

    def record(self, calibration) -> dict:
        """What kiln.json keeps of the run."""
        import torch

        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))   # torchrun's count of nodes
        return {"processes": self.world, "backend": self.backend, **({"nodes": nodes} if nodes > 1 else {}),
                "samples_per_rank": [len(s) for s in torch.tensor_split(calibration, self.world)]}


def run(request: QuantizeRequest, model_dir: Path, calibration, out_dir: Path, progress,
        placement: Placement) -> CheckpointRecord | None:
    """ModelOpt on `request.processes` ranks of this host (of each of `request.nodes` hosts), rank 0 exporting;
    returns rank 0's record, or None on a node other than 0 (which writes nothing)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="kiln-ranks-") as job:
        job = Path(job)
        torch.save(calibration.contiguous(), job / CALIBRATION)
        (job / JOB).write_text(json.dumps({"request": _encode(request), "model_dir": str(model_dir),
                                           "out_dir": str(out_dir), "placement": placement.as_dict()}))
        writes = launch(request, sys.executable, ["kiln.quantize.distributed", str(job)], os.environ, progress,
                        placement, len(torch.tensor_split(calibration, request.ranks)[0]))
    return CheckpointRecord.load(out_dir) if writes else None


def launch(request: QuantizeRequest, python: str, rank_module: list[str], env: dict, progress, placement: Placement,
           rank_windows: int | None = None) -> bool:
    """torchrun in `python`, `python -m RANK_MODULE...` as each of `request.processes` ranks on this host (one node of
    `request.nodes`), supervised: raises CalibrationRankError when a rank fails, and returns whether this host's
    node writes (node 0). `rank_windows`: rank 0's share, which its progress lines count (None: it sends none)."""
    node = Node.from_environment(request.nodes)
    processes = request.processes
    if placement.on_gpu and len(placement.gpus) < processes:
        shown = len(placement.gpus)
        raise UserInputError(f"calibration.processes: {processes} on GPUs: each rank calibrates on a GPU of its own "
                             f"and this host shows {shown} (fix: processes: {shown or 1}, or device: cpu)")
    command = [python, "-m", "torch.distributed.run", *node.launcher_arguments(processes), "--max-restarts=0",
               f"--monitor-interval={MONITOR_INTERVAL_S}", "-m", *rank_module]
    # Each rank's math threads: the host's cores shared out (torchrun's own default is one thread a rank).
    threads = max(1, (os.cpu_count() or 1) // processes) if placement.device == "cpu" else 1
    env = {**env, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    label = request.label
    where = f"on {processes} processes" + (f" x {node.count} nodes" if node.count > 1 else "")
    title = (f"calibrate {label} {where}" + (" (rank 0's share)" if rank_windows else "") if node.writes else
             f"calibrate {label} {where}: node {node.rank}'s share (node 0 shows progress)")
    with progress.task(title, total=rank_windows if node.writes else None) as task:
        returncode, stderr = _supervise(command, env, task)
    if returncode != 0:
        raise CalibrationRankError(_failure_line(label, node, processes, returncode, stderr))
    return node.writes


def _supervise(command: list[str], env: dict, task) -> tuple[int, list[str]]:
    """Run the launcher; rank 0's progress lines advance `task`; the last lines of stderr come back for the error."""
    import threading

    tail: deque[str] = deque(maxlen=200)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)

    def read_stderr() -> None:
        for line in process.stderr:
            tail.append(line.rstrip("\n"))
            if os.environ.get("KILN_DEBUG") == "1":
                print(line, end="", file=sys.stderr)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        for line in process.stdout:
            if line.startswith(PROGRESS):
                task.advance(float(line[len(PROGRESS):]))
        process.wait()
    except BaseException:   # interrupted: the ranks go with this process, not on as orphans
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    reader.join()
    return process.returncode, list(tail)


def _failure_line(label: str, node: Node, processes: int, returncode: int, stderr: list[str]) -> str:
    """One line from torchrun's failure summary: which rank ended, and how (a signal's name, or its exit code);
    or which node found no rendezvous."""
    text = "\n".join(stderr)
    ranks_total = processes * node.count
    if node.count > 1 and not re.search(r"rank\s*:\s*\d+", text) and re.search(
            r"timed out|Timed out|TimeoutError|DistNetworkError|Connection refused|Name or service not known", text):
        peers = "every other node" if node.writes else "node 0"
        return (f"{label}: node {node.rank} of {node.count} did not meet {peers} at the rendezvous {node.endpoint} "
                f"within {node.timeout_s} s; nothing was cached (fix: start `kiln build --stage quantize` on all "
                f"{node.count} nodes, with {RENDEZVOUS} naming node 0's host and a port open between them)")
    ranks = re.findall(r"rank\s*:\s*(\d+)", text)
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", text)
    how = ""
    if codes:
        code = int(codes[0])
        how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_ \
            else f"exit code {code}"
    errors = [line.strip() for line in stderr if re.search(r"(Error|Exception):", line) and "torch.distributed" not in
              line and "ChildFailedError" not in line]
    cause = f": {errors[-1][:240]}" if errors and not how.startswith("killed") else ""
    who = f"rank {ranks[0]} of {ranks_total}" if ranks else f"the launcher of {ranks_total} ranks"
    return (f"{label}: calibration across {ranks_total} processes failed: {who} ended ({how or f'exit {returncode}'})"
            f"{cause}; nothing was cached (run kiln build again; KILN_DEBUG=1 shows every rank's output)")


def _encode(request: QuantizeRequest) -> dict:
    return json.loads(json.dumps(asdict(request), default=lambda value: getattr(value, "value", value)))


def _decode(fields: dict) -> QuantizeRequest:
    auto = fields.get("auto")
    return QuantizeRequest(**{
        **fields,
        "quant": fields["quant"] if fields["quant"] == AUTO else QuantFormat(fields["quant"]),
        "kv_cache": KVCacheFormat(fields["kv_cache"]), "backend": Backend(fields["backend"]),
        "exclude": tuple(fields["exclude"]), "only": tuple(fields["only"]),
        "auto": AutoRequest(**{**auto, "formats": tuple(QuantFormat(q) for q in auto["formats"])}) if auto else None,
    })


class _RankProgress:
    """A progress reporter for a rank: rank 0's counts go to stdout, for the launching process's bar."""

    def __init__(self, reports: bool):
        self.reports = reports
        self.stream = sys.__stdout__   # quiet_libraries sends sys.stdout to /dev/null while the rank works

    def task(self, description: str, total):
        import contextlib

        reports, stream = self.reports, self.stream

        class _Task:
            def advance(self, amount: float = 1) -> None:
                if reports:
                    print(f"{PROGRESS}{amount}", file=stream, flush=True)

            def restart(self, description: str) -> None:
                pass

        return contextlib.nullcontext(_Task())

    def log(self, message: str) -> None:
        if self.reports:
            print(message, file=sys.stderr, flush=True)


def _rank_placement(placement: dict, local_rank: int) -> Placement:
    """The parent's placement as one rank sees it: the CPU, or the one GPU of its local rank."""
    if placement["device"] != "cuda":
        return Placement("cpu")
    gpu = VisibleGpu(**placement["gpus"][local_rank])
    caps = placement["max_memory"]
    return Placement("cuda", (gpu,), {gpu.index: caps[str(gpu.index)], **({"cpu": caps["cpu"]} if "cpu" in caps
                                                                          else {})})


def _rank_main(job: Path) -> None:
    import torch
    import torch.distributed as dist

    from kiln.common.progress import quiet_libraries
    from kiln.quantize import modelopt_backend
    from kiln.quantize.families import family_of

    document = json.loads((job / JOB).read_text())
    placement = _rank_placement(document["placement"], int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if placement.on_gpu else "gloo"
    if placement.on_gpu:
        torch.cuda.set_device(placement.gpus[0].index)
    dist.init_process_group(backend)
    group = RankGroup(dist.get_rank(), dist.get_world_size(), backend)
    request, model_dir = _decode(document["request"]), Path(document["model_dir"])
    calibration = torch.load(job / CALIBRATION, weights_only=True)
    source_config = json.loads((model_dir / "config.json").read_text())
    try:
        with quiet_libraries():
            modelopt_backend.run(request, model_dir, calibration, Path(document["out_dir"]),
                                 _RankProgress(group.writes), placement, None, family_of(source_config),
                                 source_config, ranks=group)
    finally:
        if dist.is_initialized():   # a rank that failed before leave()
            dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
