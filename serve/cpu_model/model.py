"""Triton python-backend model: text in, text out, from a kiln artifact on the CPU.

Copied by `kiln triton-repo --runtime cpu` into two models that share the artifact at
<repo>/artifact/: kiln_llm answers each request with one response (HTTP and gRPC infer);
kiln_llm_stream is decoupled and, with stream=true, sends one response per token, then a
final flag (gRPC streaming). Generation is kiln's reference runtime, the code that
validated the checkpoint (kiln.serve.generation).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from kiln.serve.generation import ReferenceGenerator

        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        artifact = (Path(args["model_repository"]) / params["artifact"]).resolve()
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.default_max_tokens = int(params.get("default_max_tokens", "64"))
        self.generator = ReferenceGenerator(artifact / "hf", params.get("trust_remote_code") == "true")

    @staticmethod
    def _optional(request, name, default):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return default if tensor is None else tensor.as_numpy().reshape(-1)[0]

    @staticmethod
    def _response(text, token_ids):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("output_ids", np.array([token_ids], dtype=np.int32)),
        ])

    def execute(self, requests):
        # Dynamic batching hands over several requests at once; each is generated on its own, so
        # that every request gets exactly the tokens it would get alone.
        if not self.decoupled:
            return [self._answer(request) for request in requests]
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt = self._optional(request, "text_input", b"").decode("utf-8")
                max_tokens = int(self._optional(request, "max_tokens", self.default_max_tokens))
                stream = bool(self._optional(request, "stream", False))
                if max_tokens < 1:
                    raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
                if stream:
                    for piece in self.generator.stream(prompt, max_tokens):
                        sender.send(self._response(piece.text, [piece.token_id]))
                else:
                    ids, text = self.generator.complete(prompt, max_tokens)
                    sender.send(self._response(text, ids))
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as exc:  # the client gets the message; the model stays up
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _answer(self, request):
        try:
            prompt = self._optional(request, "text_input", b"").decode("utf-8")
            max_tokens = int(self._optional(request, "max_tokens", self.default_max_tokens))
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
            ids, text = self.generator.complete(prompt, max_tokens)
            return self._response(text, ids)
        except Exception as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
