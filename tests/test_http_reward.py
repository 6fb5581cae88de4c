"""The `http` reward against the reference server (`prdp_core.reward_server`) and against misbehaving stubs."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from prdp_core import TrainConfig, Trainer
from prdp_core.checkpoints import latest_checkpoint
from prdp_core.errors import RewardError
from prdp_core.reward_server import RewardServer
from prdp_core.rewards import create_reward
from prdp_core.rewards import http as http_reward
from prdp_core.rewards.jpeg import JpegCompressibility


def _images(n=3):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256 >> i, (32, 32, 3), dtype=np.uint8)) for i in range(n)]


class _StubServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping past the client's timeout must not block shutdown


@pytest.fixture
def serve():
    """start(reward) serves a Reward with the reference server; start(handler=cls) serves a stub. Returns the URL."""
    servers = []

    def start(reward=None, handler=None):
        server = RewardServer(reward, "127.0.0.1", 0) if handler is None else _StubServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(http_reward, "BACKOFF_S", 0.001)


def _stub(status=200, body='{"scores": [1.0, 2.0, 3.0]}', delay=0.0):
    """A handler class answering every POST with `status` and `body` after `delay` s; `.requests` counts them."""
    class Handler(BaseHTTPRequestHandler):
        requests = 0

        def do_POST(self):
            type(self).requests += 1
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay)
            data = body.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except BrokenPipeError:  # the client timed out and left
                pass

        def log_message(self, *args):
            pass
    return Handler


def _post(url, payload: bytes):
    request = urllib.request.Request(url, data=payload, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_scores_through_the_reference_server_equal_local_scores(serve):
    url = serve(create_reward("jpeg_compressibility"))
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        assert json.loads(response.read()) == {"reward": "jpeg_compressibility", "status": "ok"}
    images, prompts = _images(3), ["a", "b", "c"]
    remote = create_reward("http", options={"url": url, "batch_size": 2})  # two requests: 2 images, then 1
    local = create_reward("jpeg_compressibility").score(images, prompts)
    assert torch.equal(remote.score(images, prompts), local)


class _Switchable(JpegCompressibility):
    """jpeg_compressibility that fails like a crashing model once `failing` is set."""

    def __init__(self):
        super().__init__()
        self.failing = threading.Event()

    def score_batch(self, images, prompts):
        if self.failing.is_set():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().score_batch(images, prompts)


def test_reference_server_answers_bad_requests_and_scorer_failures_and_stays_up(serve):
    reward = _Switchable()
    url = serve(reward)
    status, answer = _post(url, b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = _post(url, json.dumps({"images": ["aGVsbG8="], "prompts": ["a"]}).encode())
    assert status == 400 and "image 0 is not a base64-encoded image" in answer["error"]
    status, answer = _post(url, json.dumps({"images": [], "prompts": ["a"]}).encode())
    assert status == 400 and "0 images and 1 prompts" in answer["error"]
    reward.failing.set()
    status, answer = _post(url, json.dumps({"images": [http_reward._png_base64(_images(1)[0])],
                                            "prompts": ["a"]}).encode())
    assert status == 500 and "illegal memory access" in answer["error"]
    reward.failing.clear()
    assert create_reward("http", options={"url": url}).score(_images(2), ["a", "b"]).shape == (2,)


@pytest.mark.parametrize("status,body,message,attempts", [
    (500, '{"error": "model crashed"}', r"failed with HTTP 500: 'model crashed'; see the server's log \(after 3 "
     r"attempts\)", 3),
    (404, "<html>no such page</html>", "refused the request with HTTP 404: '<html>no such page</html>'", 1),
    (200, "scores: 1, 2, 3", "answered with invalid JSON", 1),
    (200, '{"score": [1, 2, 3]}', 'without a "scores" list', 1),
    (200, '{"scores": [1.0, 2.0]}', "returned 2 scores for 3 images", 1),
    (200, '{"scores": [1.0, NaN, 2.0]}', "returned 1 non-finite score", 1),
])
def test_misbehaving_server_gets_a_clear_error(serve, no_backoff, status, body, message, attempts):
    handler = _stub(status, body)
    reward = create_reward("http", options={"url": serve(handler=handler)})
    with pytest.raises(RewardError, match=message):
        reward.score(_images(3), ["a", "b", "c"])
    assert handler.requests == attempts  # only server-side failures are retried


def test_timeout_is_retried_then_a_clear_error(serve, no_backoff):
    handler = _stub(delay=1.0)
    reward = create_reward("http", options={"url": serve(handler=handler), "timeout": 0.2, "retries": 1})
    with pytest.raises(RewardError, match=r"did not answer within 0.2 s; raise the http.timeout option .* \(after 2 "
                                          r"attempts\)"):
        reward.score(_images(3), ["a", "b", "c"])
    assert handler.requests == 2


def test_connection_refused_is_retried_a_bounded_number_of_times(monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reward = create_reward("http", options={"url": f"http://127.0.0.1:{port}", "retries": 2})
    attempts, waits = [], []
    post = http_reward.HttpReward._post
    monkeypatch.setattr(http_reward.HttpReward, "_post", lambda self, body: attempts.append(1) or post(self, body))
    monkeypatch.setattr(http_reward.time, "sleep", waits.append)
    with pytest.raises(RewardError, match=rf"cannot reach reward server http://127.0.0.1:{port} .*start it .*after 3 "
                                          r"attempts"):
        reward.score(_images(1), ["a"])
    assert len(attempts) == 3 and waits == [0.5, 1.0]  # 2 retries, short doubling backoff


@pytest.mark.parametrize("options,message", [
    ({}, "needs its server's address as option url"),
    ({"url": "127.0.0.1:8765"}, "needs its server's address"),
    ({"url": "http://x", "retries": -1}, "retries must be an integer of at least 0"),
    ({"url": "http://x", "timeout": 0}, "timeout must be a number of seconds above 0"),
    ({"url": "http://x", "batch_size": 2.5}, "batch_size must be an integer of at least 1"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(RewardError, match=message):
        create_reward("http", options=options)


def test_server_failing_mid_training_keeps_the_finished_epoch(serve, no_backoff, tiny_config):
    reward = _Switchable()
    url = serve(reward)
    config = TrainConfig.from_dict({**tiny_config.to_dict(), "epochs": 2, "num_steps": 2, "prompts_per_epoch": 1,
                                    "updates_per_epoch": 1, "rewards": {"http": 1.0},
                                    "reward_options": {"http": {"url": url, "retries": 1}}})
    events = []

    def on_event(event):
        events.append(event)
        if event.kind == "EpochEnd" and event.epoch == 1:
            reward.failing.set()  # the server's model breaks before epoch 2 is scored
    trainer = Trainer(config, on_event)
    with pytest.raises(RewardError, match="HTTP 500: .*failed while scoring: RuntimeError: CUDA error"):
        trainer.run()
    assert events[-1].kind == "Failed" and "HTTP 500" in events[-1].message
    assert latest_checkpoint(trainer.run_dir).name == "epoch-0001"
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]

    reward.failing.clear()  # the server is back: the run continues from epoch 1 and finishes
    resumed = []
    Trainer.resume(trainer.run_dir, resumed.append).run()
    assert resumed[0].start_epoch == 1 and resumed[-1].kind == "Finished"
    with safe_open(str(resumed[-1].lora_path), framework="pt") as f:  # a shared LoRA must not leak the address
        assert json.loads(f.metadata()["prdp_config"])["reward_options"] == {"http": {"url": "<url>", "retries": 1}}


def test_a_server_that_is_not_running_is_found_before_anything_loads(serve, tiny_config, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loaded = []
    monkeypatch.setattr("prdp_core.trainer.load_pipeline", lambda *args, **kwargs: loaded.append(1))
    config = TrainConfig.from_dict({**tiny_config.to_dict(), "rewards": {"http": 1.0},
                                    "reward_options": {"http": {"url": f"http://127.0.0.1:{port}/score"}}})
    with pytest.raises(RewardError, match=rf"cannot reach reward server http://127.0.0.1:{port}/score .*start it"):
        Trainer(config).run()
    assert loaded == []  # found before the model loads
    without_health = serve(handler=_stub())  # a server of the user's own, with no /health page: it answers
    Trainer(TrainConfig.from_dict({**config.to_dict(), "reward_options": {"http": {"url": without_health}}}))
