"""`prdp reward-server`: serve any reward over HTTP with the protocol the `http` reward speaks.

    POST /        {"images": [base64 PNG, ...], "prompts": [str, ...]}  ->  200 {"scores": [float, ...]}
    GET / or /health                                                    ->  200 {"reward": NAME, "status": "ok"}
    errors                                -> 400 (bad request) or 500 (the scorer failed): {"error": "..."}

Typical use: the reward model lives on a GPU machine or in another Python environment than the trainer. The
server has no authentication, so it binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from .errors import PrdpError, RewardError
from .network import LOOPBACK_HOSTS
from .rewards.base import Reward

MAX_BODY_BYTES = 1 << 30  # a request beyond 1 GiB is a mistake, not a batch of images


class _BadRequest(Exception):
    pass


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server around one reward; a lock lets one request at a time use the (GPU) model."""

    daemon_threads = True

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 8765, log_requests: bool = False):
        self.reward, self.log_requests = reward, log_requests
        self.score_lock = threading.Lock()
        if ":" in host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def do_GET(self):
        if self.path.split("?")[0] in ("/", "/health"):
            self._send(HTTPStatus.OK, {"reward": self.server.reward.name, "status": "ok"})
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}; GET /health or POST / to score."})

    def do_POST(self):
        try:
            images, prompts = self._read_request()
        except _BadRequest as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        try:
            with self.server.score_lock:
                scores = self.server.reward.score(images, prompts)
        except RewardError as exc:
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)})
            return
        except Exception as exc:  # the server outlives a failing scorer; the client sees what failed
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self._send(HTTPStatus.OK, {"scores": scores.tolist()})

    def _read_request(self) -> tuple[list, list[str]]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _BadRequest("the request has no Content-Length; send the JSON body with its length.") from None
        if not 0 < length <= MAX_BODY_BYTES:
            raise _BadRequest(f"the request body must hold 1 byte to {MAX_BODY_BYTES} bytes, got {length}.")
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _BadRequest(f"the request body is not JSON ({exc}).") from None
        images, prompts = (body.get("images"), body.get("prompts")) if isinstance(body, dict) else (None, None)
        if not (isinstance(images, list) and isinstance(prompts, list)
                and all(isinstance(x, str) for x in images + prompts)):
            raise _BadRequest('the request must be {"images": [base64 PNG, ...], "prompts": [str, ...]}.')
        if len(images) != len(prompts) or not images:
            raise _BadRequest(f"the request holds {len(images)} images and {len(prompts)} prompts; send one prompt "
                              f"per image, at least one.")
        decoded = []
        for i, text in enumerate(images):
            try:
                decoded.append(Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB"))
            except Exception as exc:  # whatever fails to decode, the client sent it
                raise _BadRequest(f"image {i} is not a base64-encoded image ({exc}).") from None
        return decoded, prompts

    def _send(self, status: HTTPStatus, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        if self.server.log_requests:
            super().log_message(format, *args)


def serve(reward: Reward, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Load the reward, then serve it until interrupted (the `prdp reward-server` command)."""
    reward.ensure_loaded()  # fail at start-up, not on the first request
    try:
        server = RewardServer(reward, host, port, log_requests=True)
    except OSError as exc:
        raise PrdpError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or "
                        f"--host.") from None
    if host not in LOOPBACK_HOSTS:
        print(f"warning: listening on {host}: anyone who can reach port {server.server_address[1]} can use this "
              f"reward (there is no authentication).", file=sys.stderr)
    print(f"serving reward {reward.name!r} at {server.url} (POST images and prompts as JSON; GET /health); "
          f"Ctrl-C stops.", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
