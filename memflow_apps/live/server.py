"""The ``memflow live`` web app: a small ASGI app (starlette, served by uvicorn) with the page
(``page/``) and one websocket, ``/ws``, over which the page gets the video chunk by chunk (a JSON
header, then each frame as an image in a binary message) and sends its commands as JSON.

The websocket's messages, server to page: ``hello`` (what the server streams), then those of
``LiveSession`` (``started``, ``applied``, ``chunk`` + frames, ``done``, ``saved``, ``error``),
and the replies to commands (``pending``, ``state``, ``saving``, ``pong``, ``error``); a second
page gets ``busy`` and is closed. Page to server: ``{"type": "prompt", "text"}``, ``pause``,
``resume``, ``{"type": "restart", "seed"}``, ``save``, ``{"type": "shown", "chunk",
"generation"}`` (a chunk was drawn: one more may be made) and ``{"type": "ping", "t"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from memflow_adapter.extras import import_optional
from memflow_adapter.pipeline import MemFlowStreamingPipeline

from .session import LiveSession, LiveSettings

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.websockets import WebSocket

#: The page: index.html, app.js, style.css (package data).
PAGE = Path(__file__).with_name("page")
#: The names of this machine the page answers to unless the server is exposed (a page reached
#: under another name, e.g. by DNS rebinding, is refused).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
#: The largest message a page may send (a prompt is at most a few KB of JSON).
MAX_MESSAGE_BYTES = 64 * 1024
_PURPOSE = "memflow live"

Send = Callable[..., Awaitable[None]]


def create_app(
    streaming: MemFlowStreamingPipeline,
    settings: LiveSettings,
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES,
) -> Starlette:
    """The app: ``GET /`` the page, ``/page/*`` its files, ``/ws`` its websocket; one page at a
    time streams ``streaming`` as ``settings`` say (``allowed_hosts``: the Host names served,
    ``("*",)`` for any)."""
    applications = import_optional("starlette.applications", "live", _PURPOSE)
    middleware = import_optional("starlette.middleware", "live", _PURPOSE)
    trusted = import_optional("starlette.middleware.trustedhost", "live", _PURPOSE)
    responses = import_optional("starlette.responses", "live", _PURPOSE)
    routing = import_optional("starlette.routing", "live", _PURPOSE)
    staticfiles = import_optional("starlette.staticfiles", "live", _PURPOSE)
    hello = {
        "type": "hello", "model": settings.model, "memory": streaming.config.describe(),
        "fps": settings.fps, "height": settings.height, "width": settings.width,
        "num_latent_frames": settings.num_latent_frames,
        "frames_per_chunk": streaming.config.frames_per_chunk,
        "max_prompt_chars": settings.max_prompt_chars, "prompt": settings.prompt,
        "seed": settings.seed, "suggestions": list(settings.suggestions),
    }
    running: list[LiveSession] = []  # the one generation (the event loop's thread only)

    async def page(request: Any) -> Any:
        return responses.FileResponse(PAGE / "index.html")

    async def live(websocket: WebSocket) -> None:
        if not _same_origin(websocket.headers):
            await websocket.close(code=1008)  # another site's page: refused before accepting
            return
        await websocket.accept()
        if running:
            await websocket.send_json({"type": "busy", "message": "this server is streaming "
                                       "to another page: one generation at a time"})
            await websocket.close(code=1013)
            return
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[tuple[dict, list[bytes]]] = asyncio.Queue()
        lock = asyncio.Lock()

        def emit(message: dict, blobs: list[bytes]) -> None:  # from the session's thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(outbox.put_nowait, (message, blobs))

        async def send(message: dict, blobs: list[bytes] = ()) -> None:
            async with lock:  # a chunk's header and frames go together
                await websocket.send_text(json.dumps(message))
                for blob in blobs:
                    await websocket.send_bytes(blob)

        async def pump() -> None:  # bounded: the session makes chunks only as the page shows them
            try:
                while True:
                    await send(*await outbox.get())
            except Exception:  # the page went away (each server has its error): the reader ends
                return

        session = LiveSession(streaming, settings, emit)
        running.append(session)
        pumping = asyncio.create_task(pump())
        try:
            await send(hello)
            session.start()
            await _read_commands(websocket, session, send)
        finally:
            session.stop()  # a closed page stops the generation after the chunk being made
            pumping.cancel()
            try:
                await asyncio.to_thread(session.join)
            finally:  # even when cancelled (the server stopping): the chunk being made ends it
                running.remove(session)

    return applications.Starlette(
        routes=[
            routing.Route("/", page),
            routing.Mount("/page", staticfiles.StaticFiles(directory=PAGE), name="page"),
            routing.WebSocketRoute("/ws", live),
        ],
        middleware=[middleware.Middleware(trusted.TrustedHostMiddleware,
                                          allowed_hosts=list(allowed_hosts))],
    )


def _same_origin(headers: Any) -> bool:
    """Whether a websocket comes from the page this server serves: browsers send the page's
    origin (a websocket is not bound by the same-origin policy, so another site's page could
    otherwise drive this one); a client without an origin is not a browser page."""
    origin = headers.get("origin")
    return origin is None or urlsplit(origin).netloc == headers.get("host")


async def _read_commands(websocket: WebSocket, session: LiveSession, send: Send) -> None:
    """Apply the page's commands until it goes away; a bad command gets an ``error`` reply."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            reply = _command(session, message.get("text"))
        except ValueError as error:
            reply = {"type": "error", "message": str(error)}
        if reply is not None:
            await send(reply)


def _command(session: LiveSession, text: str | None) -> dict | None:
    """Apply one command (JSON text); the reply to send, if any."""
    try:
        command = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        command = None
    if not isinstance(command, dict) or not isinstance(command.get("type"), str):
        raise ValueError('a command must be a JSON object with a "type", e.g. '
                         '{"type": "prompt", "text": "..."}')
    kind = command["type"]
    if kind == "prompt":
        prompt, replaced = session.offer_prompt(command.get("text"))
        return {"type": "pending", "prompt": prompt, "replaced": replaced}
    if kind == "pause":
        session.pause()
        return {"type": "state", "paused": session.paused}
    if kind == "resume":
        session.resume()
        return {"type": "state", "paused": session.paused}
    if kind == "restart":
        session.restart(command.get("seed"))
        return None
    if kind == "save":
        session.save()
        return {"type": "saving"}
    if kind == "shown":
        session.shown(command.get("chunk"), command.get("generation"))
        return None
    if kind == "ping":
        return {"type": "pong", "t": command.get("t"), "server_t": time.monotonic()}
    raise ValueError(f"unknown command type {kind!r}; expected one of prompt, pause, resume, "
                     "restart, save, shown, ping")


def check_host(host: str, expose: bool) -> tuple[str, ...]:
    """The Host names the app serves when bound to ``host``: this machine's only, unless
    ``expose`` (then any, with a warning on stderr).

    Raises:
        ValueError: ``host`` is not a loopback address and ``expose`` is not given.
    """
    if host in LOOPBACK_NAMES:
        return LOOPBACK_NAMES
    if not expose:
        raise ValueError(
            f"--host {host} would serve the page to other machines; expected 127.0.0.1 (reach it "
            "from elsewhere through an SSH tunnel), or add --expose to mean it"
        )
    print(f"memflow live: WARNING: serving on {host}: anyone who reaches this port can generate, "
          "type prompts and save files on this machine (there is no login)", file=sys.stderr)
    return ("*",)


def serve(app: Starlette, host: str, port: int) -> None:
    """Serve ``app`` until Ctrl-C."""
    uvicorn = import_optional("uvicorn", "live", _PURPOSE)
    uvicorn.run(app, **_uvicorn_options(host, port))


@contextlib.contextmanager
def serving(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` on a thread while the block runs (``port`` 0: a free one); yields its URL."""
    uvicorn = import_optional("uvicorn", "live", _PURPOSE)
    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **_uvicorn_options(host, port)))
    thread = threading.Thread(target=server.run, name="memflow-live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the live server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _uvicorn_options(host: str, port: int) -> dict[str, Any]:
    # frames are PNG/JPEG already: deflating them again costs time and saves nothing
    return {"host": host, "port": port, "ws_max_size": MAX_MESSAGE_BYTES,
            "ws_per_message_deflate": False, "log_level": "warning"}
