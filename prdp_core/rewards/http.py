"""A reward computed by an HTTP server, e.g. a reward model on another machine or in another Python environment.

The protocol (`prdp reward-server` implements it for any registered reward):
    POST <url>   {"images": [base64 PNG, ...], "prompts": [str, ...]}   (Content-Type: application/json)
    200          {"scores": [float, ...]}   one finite number per image, in order
Connection failures, timeouts and 5xx answers are retried `retries` times with a short backoff; 4xx and malformed
answers are not (asking again would get the same answer).

A mix names each reward once, so `http` can appear once in it; to combine several remote scorers, serve them
from one endpoint (a module:function scorer that sums them, run by `prdp reward-server`).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request

from ..errors import RewardError
from ..network import LOOPBACK_HOSTS
from .base import Reward, register_reward

BACKOFF_S = 0.5  # first retry's wait; doubles each retry
CHECK_TIMEOUT_S = 10.0  # the check before a run: the server answers, however slow its scoring is


class _Retryable(Exception):
    """A failure that may pass: the server is not reachable (yet), too slow, or failed on its side."""


@register_reward("http")
class HttpReward(Reward):
    """Scores from a server speaking the protocol above; options: url, timeout (s), retries, batch_size."""

    name = "http"

    def __init__(self, device="cpu", dtype="fp32", url: str = "", timeout: float = 60.0, retries: int = 2,
                 batch_size: int = 16):
        super().__init__(device=device, dtype=dtype)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise RewardError(f"reward 'http' needs its server's address as option url, e.g. "
                              f"http://127.0.0.1:8765, got {url!r}.")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise RewardError(f"reward 'http' option timeout must be a number of seconds above 0, got {timeout!r}.")
        for option, value, minimum in (("retries", retries, 0), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise RewardError(f"reward 'http' option {option} must be an integer of at least {minimum}, got "
                                  f"{value!r}.")
        self.url, self.timeout, self.retries, self.batch_size = url, float(timeout), retries, batch_size
        # A local server must not be sent through an http_proxy meant for the outside world.
        local = urllib.parse.urlsplit(url).hostname in LOOPBACK_HOSTS
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if local else \
            urllib.request.build_opener()

    def check(self) -> None:
        """The server answers at all (GET /health on its host; any HTTP answer will do, a server need not have it),
        so that a server that is not running is found before the run loads a model and samples its first images."""
        parts = urllib.parse.urlsplit(self.url)
        health = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/health", "", ""))
        try:
            with self._opener.open(health, timeout=min(self.timeout, CHECK_TIMEOUT_S)):
                pass
        except urllib.error.HTTPError:
            pass  # it answered
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise RewardError(f"cannot reach reward server {self.url} ({reason}); start it (prdp reward-server "
                              f"--reward NAME) or fix the url option of the http reward.") from None

    def score_batch(self, images, prompts):
        body = json.dumps({"images": [_png_base64(image) for image in images], "prompts": prompts}).encode()
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return self._post(body)
            except _Retryable as exc:
                if attempt + 1 == attempts:
                    raise RewardError(f"{exc} (after {attempts} attempt{'s' * (attempts > 1)}).") from None
                time.sleep(BACKOFF_S * 2 ** attempt)

    def _post(self, body: bytes) -> list:
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                text = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc.read().decode("utf-8", errors="replace"))
            if exc.code >= 500:
                raise _Retryable(f"reward server {self.url} failed with HTTP {exc.code}: {detail}; see the "
                                 f"server's log") from None
            raise RewardError(f"reward server {self.url} refused the request with HTTP {exc.code}: {detail}; check "
                              f"the url option and that the server speaks the prdp reward protocol.") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):  # timed out while connecting
                raise self._timed_out() from None
            raise _Retryable(f"cannot reach reward server {self.url} ({exc.reason}); start it (prdp reward-server "
                             f"--reward NAME) or fix the url option of the http reward") from None
        except TimeoutError:  # timed out while waiting for the answer
            raise self._timed_out() from None
        except (OSError, http.client.HTTPException) as exc:  # e.g. the server dropped the connection mid-answer
            raise _Retryable(f"connection to reward server {self.url} failed ({exc})") from None
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            raise RewardError(f"reward server {self.url} answered with invalid JSON ({text[:200]!r}); it must answer "
                              f'{{"scores": [float, ...]}}.') from None
        if not isinstance(answer, dict) or not isinstance(answer.get("scores"), list):
            raise RewardError(f"reward server {self.url} answered without a \"scores\" list ({text[:200]!r}); it "
                              f'must answer {{"scores": [float, ...]}}.')
        return answer["scores"]  # the base class checks the count and that every score is finite

    def _timed_out(self) -> _Retryable:
        return _Retryable(f"reward server {self.url} did not answer within {self.timeout:g} s; raise the http.timeout "
                          f"option or lower http.batch_size")


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _error_detail(body: str) -> str:
    """The server's {"error": ...} message if it sent one, else the start of its answer."""
    try:
        message = json.loads(body).get("error")
    except (json.JSONDecodeError, AttributeError):
        message = None
    return repr(str(message)[:200] if message else body[:200])
