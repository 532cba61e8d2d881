"""kiln serve's HTTP front door for tritonserver 2.51 (nvidia-pytriton's, the CPU runtime).

Triton 2.51's HTTP server dies with SIGSEGV on a request body of about 5 MB or more, whatever the body
holds (measured here: 4 MB answered 400, 6 MB and 16 MB killed the server; gRPC refuses the same sizes
cleanly), and it has no option that bounds a body. So `kiln serve` has tritonserver listen on a private
loopback port and puts this gate on the public one: it reads each request's head, refuses a body larger
than the artifact can accept (413) or of undeclared length (411) before any of it reaches Triton, and
relays everything else byte for byte, both ways (streamed responses included). Requests on one
connection are framed by their Content-Length, so a second request cannot slip past the check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

HEAD_BYTES = 64 << 10            # a request head larger than this is refused (431)
TRITON_BODY_CAP = 2 << 20        # well under the ~5 MB that crashes Triton 2.51, whatever the artifact accepts
_RELAY_CHUNK = 1 << 16
_DISCARD_BYTES = 256 << 20    # what a refused client may still send before the gate stops reading


class HttpGate:
    """Listens on 127.0.0.1:`port`, relays to 127.0.0.1:`target`, refuses bodies over `max_body_bytes`."""

    def __init__(self, port: int, target: int, max_body_bytes: int, why: str):
        self.port, self.target, self.max_body_bytes, self.why = port, target, max_body_bytes, why
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None

    def start(self) -> "HttpGate":
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._server = self._loop.run_until_complete(
                    asyncio.start_server(self._handle, "127.0.0.1", self.port, limit=HEAD_BYTES))
            except BaseException as exc:   # the port is taken: the caller reports it
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            self._server.close()
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="kiln-http-gate", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            await _answer(client_writer, 502, "the server behind kiln's HTTP gate is not answering")
            return
        back = asyncio.ensure_future(_relay(upstream_reader, client_writer))
        refusal = None
        try:
            while True:
                try:
                    head = await client_reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break   # the client is done
                except asyncio.LimitOverrunError:
                    refusal = (431, f"request head over {HEAD_BYTES} bytes")
                    break
                length, chunked = _framing(head)
                if chunked:
                    refusal = (411, "a chunked request body has no declared size; send Content-Length")
                    break
                if length > self.max_body_bytes:
                    refusal = (413, f"request body of {length} bytes; {self.why}, at most {self.max_body_bytes} bytes")
                    break
                upstream_writer.write(head)
                while length > 0:
                    chunk = await client_reader.read(min(length, _RELAY_CHUNK))
                    if not chunk:
                        break
                    upstream_writer.write(chunk)
                    length -= len(chunk)
                await upstream_writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                upstream_writer.write_eof()
            if refusal is not None:   # earlier responses first, then the refusal, then the connection closes
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(back, timeout=30)
                await _answer(client_writer, *refusal)
                # Read (and drop) what the client is still sending, so that it reads the answer instead of a reset.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(_discard(client_reader, _DISCARD_BYTES), timeout=10)
                with contextlib.suppress(OSError, RuntimeError):
                    client_writer.close()
            else:
                with contextlib.suppress(Exception):
                    await back
                with contextlib.suppress(OSError, RuntimeError):
                    client_writer.close()
            with contextlib.suppress(OSError, RuntimeError):
                upstream_writer.close()


def _framing(head: bytes) -> tuple[int, bool]:
    """(Content-Length, whether the body is chunked) of a request head."""
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = max(length, int(value.strip()))
            except ValueError:
                return 1 << 62, False   # unreadable: refused as too large
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(_RELAY_CHUNK):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass


async def _discard(reader: asyncio.StreamReader, most: int) -> None:
    while most > 0 and (chunk := await reader.read(min(most, _RELAY_CHUNK))):
        most -= len(chunk)


async def _answer(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    reasons = {411: "Length Required", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
               502: "Bad Gateway"}
    body = json.dumps({"error": message}).encode()
    with contextlib.suppress(OSError, RuntimeError, ConnectionError):
        writer.write(f"HTTP/1.1 {status} {reasons[status]}\r\nContent-Type: application/json\r\nContent-Length: "
                     f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
