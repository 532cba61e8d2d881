"""Triton python-backend model: text in, text out, from a kiln artifact on the CPU.

Copied by `kiln triton-repo --stack cpu` into two models that share the artifact at
<repo>/artifact/: kiln_llm answers each request with one response (HTTP and gRPC infer);
kiln_llm_stream is decoupled and, with stream=true, sends one response per token, then a
final flag (gRPC streaming). Generation is kiln's reference runtime, the code that
validated the checkpoint (kiln.serve.generation).

Every prompt of a batched request is answered (output_ids rows padded with -1). Requests
past the artifact's build.max_input_len / max_seq_len, empty or non-UTF-8 text are client
errors (INVALID_ARG); a cancelled request (the gRPC client gave up) stops generating.
"""

import json
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from kiln.serve.generation import ReferenceGenerator
        from kiln.serve.requests import Limits

        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        artifact = (Path(args["model_repository"]) / params["artifact"]).resolve()
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.limits = Limits.from_parameters(params)
        self.generator = ReferenceGenerator(artifact / "hf", params.get("trust_remote_code") == "true")
        self.max_prompt_bytes = self.generator.max_prompt_bytes(self.limits.max_input_len)
        self.logger = pb_utils.Logger

    @staticmethod
    def _rows(request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy().reshape(len(tensor.as_numpy()), -1)[:, 0]

    def _prompts(self, request):
        from kiln.serve.requests import checked_prompts

        texts = self._rows(request, "text_input")
        return checked_prompts([] if texts is None else list(texts), self._rows(request, "max_tokens"), self.limits,
                               self.generator.encode, self.max_prompt_bytes)

    @staticmethod
    def _response(texts, token_rows):
        from kiln.serve.requests import padded

        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)),
            pb_utils.Tensor("output_ids", np.array(padded(token_rows), dtype=np.int32)),
        ])

    def _error(self, exc):
        """A client error's own message; anything else is logged here and answered without internals."""
        from kiln.serve.requests import ClientError

        if isinstance(exc, ClientError):
            return pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
        self.logger.log_error(f"kiln_llm: {traceback.format_exc()}")
        return pb_utils.TritonError("the model failed on this request; the server log has the details")

    def _generate(self, prompts, cancelled):
        answers = [self.generator.complete(p.ids, p.max_tokens, cancelled) for p in prompts]
        if cancelled():
            self.logger.log_info(f"kiln_llm: request cancelled after {sum(len(ids) for ids, _ in answers)} tokens")
            return None
        return self._response([text for _, text in answers], [ids for ids, _ in answers])

    def execute(self, requests):
        # Dynamic batching hands over several requests at once; each is generated on its own, so
        # that every request gets exactly the tokens it would get alone.
        if not self.decoupled:
            return [self._answer(request) for request in requests]
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompts = self._prompts(request)
                streaming = self._rows(request, "stream")
                if streaming is not None and bool(streaming[0]):
                    self._stream(prompts, sender)
                else:
                    response = self._generate(prompts, sender.is_cancelled)
                    if response is not None:
                        sender.send(response)
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as exc:  # the client gets the message; the model stays up
                sender.send(pb_utils.InferenceResponse(error=self._error(exc)),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _stream(self, prompts, sender):
        from kiln.serve.requests import ClientError

        if len(prompts) != 1:
            raise ClientError(f"stream=true takes one prompt per request, got {len(prompts)}: send them separately")
        (prompt,) = prompts
        for piece in self.generator.stream(prompt.ids, prompt.max_tokens, sender.is_cancelled):
            sender.send(self._response([piece.text], [[piece.token_id]]))
        if sender.is_cancelled():
            self.logger.log_info("kiln_llm_stream: request cancelled")

    def _answer(self, request):
        try:
            response = self._generate(self._prompts(request), request.is_cancelled)
            if response is None:
                return pb_utils.InferenceResponse(error=pb_utils.TritonError("cancelled",
                                                                             pb_utils.TritonError.CANCELLED))
            return response
        except Exception as exc:
            return pb_utils.InferenceResponse(error=self._error(exc))
