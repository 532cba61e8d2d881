"""Registry throughput: publish and pull through a team registry against a plain copy of the same bytes.

    python bench/registry.py [--mb 256] [--files 8] [--embedded]

Starts Debian's PostgreSQL and `mlflow server` (proxied artifacts) on loopback ports in a
temporary folder (or, with --embedded, uses the SQLite default), publishes one artifact of
--files random files totalling --mb MiB, pulls it back (every file verified), and copies the
same files with shutil for comparison. Then it publishes the identical artifact again from a
second publisher and prints the bytes that re-publish sent: kiln's count, the server's PUT
requests, and the growth of its artifact folder. Timings swing with other work on the cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UPLOAD = '"PUT /api/2.0/mlflow-artifacts/artifacts/'


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="total MiB of the artifact")
    parser.add_argument("--files", type=int, default=8, help="number of files it is split into")
    parser.add_argument("--embedded", action="store_true", help="the SQLite default instead of a server")
    args = parser.parse_args()

    from kiln.common.progress import SILENT
    from kiln.registry import PUBLISH_KEY_TAG, publish, pull
    from kiln.registry.team import LocalPostgres, MlflowServer
    from kiln.serve.triton import free_port

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-registry-"))
    database = server = None
    try:
        source = work / "artifact"
        source.mkdir()
        size = args.mb * 1024 * 1024 // args.files
        files = {}
        for index in range(args.files):
            path = source / f"part-{index}.bin"
            path.write_bytes(os.urandom(size))
            files[f"weights/part-{index}.bin"] = path
        total = size * args.files
        if args.embedded:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
            where, artifacts, log = "embedded (SQLite + folder)", work / "home" / "registry" / "artifacts", None
        else:
            database = LocalPostgres(Path(tempfile.mkdtemp(prefix="kiln-pg-")), free_port()).start()
            artifacts, log = work / "server-artifacts", work / "mlflow-server.log"
            server = MlflowServer(database.uri, str(artifacts), port=free_port(), workers=4, log_path=log).start()
            os.environ["MLFLOW_TRACKING_URI"] = server.uri
            where = "mlflow server + PostgreSQL (loopback)"

        # Warm up: schema creation and first connections are not throughput.
        (work / "warmup.bin").write_bytes(b"warm")
        publish(work / "home", "warmup", {"warmup.bin": work / "warmup.bin"}, {PUBLISH_KEY_TAG: "w"}, [], SILENT)
        tags = {PUBLISH_KEY_TAG: "bench-1"}
        started = time.perf_counter()
        publish(work / "home", "bench", files, tags, [], SILENT)
        publish_s = time.perf_counter() - started

        started = time.perf_counter()
        pull(work / "home", "bench/1", work / "pulled", SILENT)
        pull_s = time.perf_counter() - started

        started = time.perf_counter()
        (work / "copied").mkdir()
        for rel, path in files.items():
            shutil.copyfile(path, work / "copied" / Path(rel).name)
        copy_s = time.perf_counter() - started

        uploads_before = log.read_text().count(UPLOAD) if log else None
        stored_before = folder_bytes(artifacts)
        # A second publisher of the same bytes (with the embedded store, the same machine's registry).
        again = publish(work / ("home" if args.embedded else "home-2"), "bench", files, tags, [], SILENT)
        uploads = (log.read_text().count(UPLOAD) - uploads_before) if log else "n/a"
        growth = folder_bytes(artifacts) - stored_before

        mib = total / 2**20
        print(f"registry: {where}; artifact: {args.files} files, {mib:.0f} MiB; this machine: {os.cpu_count()} cores\n")
        print("| operation | seconds | MiB/s |")
        print("|---|---|---|")
        for label, seconds in (("publish (upload, new bytes)", publish_s), ("pull (download + verify)", pull_s),
                               ("plain file copy (shutil)", copy_s)):
            print(f"| {label} | {seconds:.2f} | {mib / seconds:.0f} |")
        print("\n| unchanged re-publish | value |")
        print("|---|---|")
        print(f"| new version created | {'yes' if again.created else 'no'} |")
        print(f"| bytes kiln sent | {again.transfer.bytes if again.transfer else 0} |")
        print(f"| PUT requests the server received | {uploads} |")
        print(f"| artifact store growth, bytes | {growth} |")
        return 0
    finally:
        if server:
            server.stop()
        if database:
            database.stop()
            shutil.rmtree(database.data, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
