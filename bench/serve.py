"""CPU serving throughput and latency: Triton (python backend) against the reference runtime called directly.

    python bench/serve.py recipes/demo.yaml [--variant fp8] [--requests 16] [--max-tokens 16]

Builds the recipe into a private kiln home (cached after the first run), serves the variant
with `kiln serve`'s repository on the real tritonserver, and sends the same prompts with 1 and
8 concurrent gRPC clients. The direct rows call kiln.serve.generation in this process with
the same concurrency. Timings swing when other work shares the cores: compare within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["def parse_args(argv):", "The os module", "import sys\n", "Return the", "class Foo:", "A list is",
           "with open(path) as f:", "Raises ValueError if"]


def run_clients(ask, prompts: list[str], concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    work = list(prompts)

    def worker():
        while True:
            with lock:
                if not work:
                    return
                prompt = work.pop()
            started = time.perf_counter()
            ask(prompt)
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--variant", default="fp8")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    home = REPO / "build" / "bench-serve-home"
    os.environ["KILN_HOME"] = str(home)
    kiln = Path(sys.executable).with_name("kiln")
    subprocess.run([str(kiln), "build", str(args.recipe)], check=True, stdout=subprocess.DEVNULL)

    from kiln.common.progress import ProgressReporter
    from kiln.pipeline.recipe.loader import load_recipe
    from kiln.serve import start_server
    from kiln.serve.generation import ReferenceGenerator

    name = f"{load_recipe(args.recipe).recipe.name}-{args.variant}"
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    rows = []
    # The library's own front door (kiln serve): the same repository, server and gRPC request a user gets.
    with start_server(home, f"{name}@candidate", "cpu", ProgressReporter(), (0, 0, 0)) as running:
        generator = ReferenceGenerator(running.repo.path / "artifact" / "hf")
        ask = lambda prompt: running.ask(prompt, args.max_tokens)  # noqa: E731
        ask(prompts[0])  # warm-up
        for concurrency in (1, 8):
            rows.append(("Triton CPU (gRPC)", concurrency, *run_clients(ask, prompts, concurrency)))
    # The direct rows once the server is gone, so that it does not share the cores.
    generator.complete(prompts[0], args.max_tokens)
    for concurrency in (1, 8):
        direct = lambda prompt: generator.complete(prompt, args.max_tokens)  # noqa: E731
        rows.append(("reference runtime, direct", concurrency, *run_clients(direct, prompts, concurrency)))

    print(f"\n{name}: {args.requests} requests, {args.max_tokens} new tokens each, greedy\n")
    print(f"| {'path':<26} | clients | requests/s | p50 latency s | p99 latency s |")
    print(f"|{'-' * 28}|---------|------------|---------------|---------------|")
    for path, concurrency, elapsed, latencies in rows:
        p99 = float(np.percentile(latencies, 99))
        print(f"| {path:<26} | {concurrency:>7} | {len(latencies) / elapsed:>10.2f} | "
              f"{statistics.median(latencies):>13.3f} | {p99:>13.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
