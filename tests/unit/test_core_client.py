"""CoreClient against a real local HTTP server: retries, backoff, Retry-After, no retry on 404, timeouts."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from ml.config import Settings
from ml.data.candles import validate_candles
from ml.data.core_client import (
    CoreClient,
    CoreResponseError,
    CoreUnavailableError,
    PairNotFoundError,
    history_to_candles,
    parse_retry_after,
)
from ml.data.sources import load_candles
from ml.pairs import InvalidPairError

TF = 300_000
START = 1_704_067_200_000


def history(n: int = 20, seconds: bool = False) -> dict:
    rng = np.random.default_rng(3)
    closes = np.round(100 + np.cumsum(rng.normal(0, 1, n)), 2)
    prev = np.r_[closes[0], closes[:-1]]
    highs = np.round(np.maximum(prev, closes) + 0.5, 2)
    lows = np.round(np.minimum(prev, closes) - 0.5, 2)
    ts = START + np.arange(n) * TF
    return {
        "pair": "BTC",
        "history": {
            "closes": closes.tolist(), "highs": highs.tolist(), "lows": lows.tolist(),
            "volumes": np.round(rng.uniform(1, 50, n), 3).tolist(),
            "timestamps": (ts // 1000 if seconds else ts).tolist(),
        },
        "lastUpdate": int(ts[-1]),
    }


class FakeCore:
    """A scripted HTTP server: each request takes the next (status, headers, body, delay) step."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict, object, float]] = []
        self.default: tuple[int, dict, object, float] = (200, {}, history(), 0.0)
        self.paths: list[str] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with fake.lock:
                    fake.paths.append(self.path)
                    status, headers, body, delay = fake.script.pop(0) if fake.script else fake.default
                if delay:
                    fake.release.wait(delay)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def requests(self) -> int:
        return len(self.paths)

    def client(self, **kw) -> CoreClient:
        opts = {"timeout_s": 2.0, "retries": 3, "backoff_s": 0.01}
        opts.update(kw)
        return CoreClient(self.url, **opts)


@pytest.fixture
def core() -> Iterator[FakeCore]:
    fake = FakeCore()
    fake.thread.start()
    yield fake
    fake.release.set()
    fake.server.shutdown()
    fake.server.server_close()


def test_fetch_candles_builds_opens_from_previous_close(core):
    with core.client() as client:
        raw = client.fetch_candles("BTC")
    assert core.paths == ["/api/pair/BTC"]
    h = history()["history"]
    assert raw["ts"].tolist() == (START + np.arange(20) * TF).tolist()
    assert raw["close"].tolist() == h["closes"]
    assert raw["open"].iloc[0] == h["closes"][0]
    assert raw["open"].iloc[1:].tolist() == h["closes"][:-1]
    result = validate_candles(raw, TF)
    assert result.rejected_total == 0 and len(result.candles) == 20


def test_timestamps_in_seconds_become_ms(core):
    core.default = (200, {}, history(seconds=True), 0.0)
    with core.client() as client:
        raw = client.fetch_candles("ETH")
    assert core.paths == ["/api/pair/ETH"]
    assert raw["ts"].tolist() == (START + np.arange(20) * TF).tolist()


def test_retries_503_then_succeeds(core):
    core.script = [(503, {}, {"error": "busy"}, 0.0), (503, {}, {"error": "busy"}, 0.0)]
    with core.client(retries=3) as client:
        raw = client.fetch_candles("BTC")
    assert core.requests == 3
    assert len(raw) == 20


def test_404_is_not_retried(core):
    core.default = (404, {}, {"error": "unknown pair"}, 0.0)
    with core.client(retries=5) as client, pytest.raises(PairNotFoundError, match="HTTP 404"):
        client.fetch_candles("NOPE")
    assert core.requests == 1


def test_other_4xx_is_not_retried(core):
    core.default = (400, {}, {"error": "bad"}, 0.0)
    with core.client(retries=5) as client, pytest.raises(CoreResponseError, match="HTTP 400"):
        client.fetch_candles("BTC")
    assert core.requests == 1


def test_429_retried_honouring_retry_after_capped(core):
    core.script = [(429, {"Retry-After": "0"}, {}, 0.0), (429, {"Retry-After": "120"}, {}, 0.0)]
    delays: list[float] = []
    client = core.client(retries=3, backoff_s=0.2, max_retry_after_s=0.05, sleep=delays.append)
    with client:
        raw = client.fetch_candles("BTC")
    assert core.requests == 3 and len(raw) == 20
    assert delays == [0.0, 0.05]  # Retry-After used instead of backoff, capped


def test_exhausted_retries_raise_unavailable_with_exponential_backoff(core):
    core.default = (502, {}, {"error": "gateway"}, 0.0)
    delays: list[float] = []
    client = core.client(retries=3, backoff_s=0.01, sleep=delays.append)
    with client, pytest.raises(CoreUnavailableError, match=r"after 4 attempt\(s\): HTTP 502"):
        client.fetch_candles("BTC")
    assert core.requests == 4
    assert delays == pytest.approx([0.01, 0.02, 0.04])


def test_timeout_fails_quickly_with_bounded_attempts(core):
    core.default = (200, {}, history(), 5.0)  # the server answers after 5 s
    t0 = time.monotonic()
    client = core.client(timeout_s=0.2, retries=2, backoff_s=0.01)
    with client, pytest.raises(CoreUnavailableError, match="timed out after 0.2s"):
        client.fetch_candles("BTC")
    elapsed = time.monotonic() - t0
    assert core.requests == 3
    assert elapsed < 2.5


def test_connection_refused_is_retried_then_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    delays: list[float] = []
    client = CoreClient(f"http://127.0.0.1:{port}", timeout_s=1.0, retries=2, backoff_s=0.01,
                        sleep=delays.append)
    with client, pytest.raises(CoreUnavailableError, match="network error"):
        client.fetch_candles("BTC")
    assert len(delays) == 2


def test_invalid_pair_refused_before_any_request(core):
    with core.client() as client:
        for bad in ("btc", "../x", "A", "BTC/USDT"):
            with pytest.raises(InvalidPairError):
                client.fetch_candles(bad)
    assert core.requests == 0


@pytest.mark.parametrize("body, message", [
    (b"<html>oops</html>", "not JSON"),
    ([1, 2], "non-object"),
    ({"pair": "BTC"}, "no history"),
    ({"history": {"closes": [1.0], "highs": [1.0], "lows": [1.0], "volumes": [1.0]}}, "timestamps"),
    ({"history": {"closes": [1.0, 2.0], "highs": [1.0], "lows": [1.0], "volumes": [1.0],
                  "timestamps": [1]}}, "differ in length"),
])
def test_malformed_answers_are_response_errors(core, body, message):
    core.default = (200, {}, body, 0.0)
    with core.client() as client, pytest.raises(CoreResponseError, match=message):
        client.fetch_candles("BTC")
    assert core.requests == 1


def test_history_conversion_details():
    body = {"data": {"history": {  # a {data: ...} wrapper is accepted
        "closes": [10, 11, 9, "x"], "highs": [10.5, 11.5, 12, 1], "lows": [9.5, 10.5, 8, 1],
        "volumes": [1, 2, 3, 4], "timestamps": [START // 1000 + i * 300 for i in range(4)]}}}
    raw = history_to_candles(body)
    assert raw["open"].tolist()[:3] == [10.0, 10.5, 11.0]  # prev close 10 clamped into [10.5, 11.5]
    result = validate_candles(raw, TF)
    assert result.rejected == {**{k: 0 for k in result.rejected}, "nan": 1}
    empty = history_to_candles({"history": {k: [] for k in ("closes", "highs", "lows", "volumes", "timestamps")}})
    assert empty.empty and list(empty.columns) == ["ts", "open", "high", "low", "close", "volume"]


def test_parse_retry_after():
    assert parse_retry_after(None) is None
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert 50 < parse_retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                                time.gmtime(time.time() + 60))) <= 60


def test_load_candles_from_core_validates(core):
    h = history()
    h["history"]["volumes"][4] = -1.0  # one bad row
    core.default = (200, {}, h, 0.0)
    settings = Settings.model_validate({"data": {"source": "core", "core": {
        "url": core.url, "timeout_s": 1.0, "retries": 1, "backoff_s": 0.01}}})
    candles = load_candles("BTC", settings)
    assert len(candles) == 19 and (candles["volume"] >= 0).all()
    assert len(load_candles("BTC", settings, bars=5)) == 5
    assert candles["ts"].iloc[-1] == START + 19 * TF
