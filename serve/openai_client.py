"""A client for an OpenAI-compatible completions server (`vllm serve`; SGLang's server speaks the same API).

Standard library only: it runs in kiln's interpreter while the server runs in the runtime's own.
"""

from __future__ import annotations

import json
import urllib.request

from kiln.serve.server import Endpoints


def complete(endpoints: Endpoints, model: str, prompt: str, max_tokens: int, timeout_s: float = 600) -> str:
    """One greedy completion from /v1/completions on the server's HTTP port."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{endpoints.http}/v1/completions", body,
                                     {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:
        return json.loads(answer.read())["choices"][0]["text"]


def completions_url(endpoints: Endpoints) -> str:
    """Where a client points its OpenAI base URL."""
    return f"http://127.0.0.1:{endpoints.http}/v1"
