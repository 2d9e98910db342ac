"""The load of `make chaos`: a few client threads on keep-alive loopback connections sending
`GET /api/predictions/{pair}` and `GET /api/predictions` through the Serve proxy, bounded in count
and time, and a poller of `/api/health`. Every request has a client timeout; nothing waits forever.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any

from bench.chaos_report import Req

CLIENT_TIMEOUT_S = 10.0


def http_json(port: int, method: str, path: str, body: dict | None = None, timeout: float = CLIENT_TIMEOUT_S
              ) -> tuple[int, Any]:
    """One request on a fresh connection: (status, decoded JSON or None); status 0 = no answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, None
    except (OSError, http.client.HTTPException):
        return 0, None
    finally:
        conn.close()


def _classify(path: str, status: int, raw: bytes) -> tuple[bool, int, str]:
    """(fallback, history records the answer stands for, error text) of one answer."""
    if status != 200:
        return False, 0, f"{status}: {raw[:120].decode(errors='replace')}"
    try:
        body = json.loads(raw)
    except ValueError:
        return False, 0, "200 with a body that is not JSON"
    if "predictions" in body and isinstance(body["predictions"], dict):
        preds = body["predictions"]
        bad = [p for p, v in preds.items() if isinstance(v, dict) and v.get("fallback")]
        reason = next((str(preds[p].get("reason", ""))[:120] for p in bad), "")
        return bool(bad), len(preds), (f"fallback ({','.join(bad)}): {reason}" if bad else "")
    pred = body.get("prediction", body)
    fb = bool(pred.get("fallback")) if isinstance(pred, dict) else False
    reason = str(pred.get("reason", ""))[:120] if fb and isinstance(pred, dict) else ""
    return fb, 1, (f"fallback: {reason}" if fb else "")


class Load:
    """`clients` threads cycling through `paths` until stop() or `max_requests` answers in all; each
    client waits `pace_s` between requests so the load stays light beside a training run."""

    def __init__(self, port: int, paths: list[str], *, clients: int, max_requests: int, pace_s: float) -> None:
        self.port = port
        self.paths = paths
        self.clients = clients
        self.max_requests = max_requests
        self.pace_s = pace_s
        self.reqs: list[Req] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Load:
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i,), name=f"chaos-client-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> list[Req]:
        self._stop.set()
        for t in self._threads:
            t.join(CLIENT_TIMEOUT_S + 5)
        with self._lock:
            return list(self.reqs)

    def _client(self, i: int) -> None:
        conn: http.client.HTTPConnection | None = None
        k = i
        while not self._stop.is_set():
            with self._lock:
                if len(self.reqs) >= self.max_requests:
                    break
            path = self.paths[k % len(self.paths)]
            k += 1
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT_S)
                conn.request("GET", path, headers={"Accept": "application/json", "Connection": "keep-alive"})
                resp = conn.getresponse()
                raw = resp.read()
                status = resp.status
                fallback, records, error = _classify(path, status, raw)
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                status, fallback, records, error = 0, False, 0, f"{type(exc).__name__}: {exc}"[:160]
                if conn is not None:
                    conn.close()
                conn = None
            req = Req(t0, time.monotonic(), status, fallback, records, error)
            with self._lock:
                self.reqs.append(req)
            self._stop.wait(self.pace_s if status else max(self.pace_s, 0.1))
        if conn is not None:
            conn.close()


class HealthPoller:
    """Polls `/api/health` every `every_s`: (monotonic time, status or 'error')."""

    def __init__(self, port: int, every_s: float = 0.5) -> None:
        self.port = port
        self.every_s = every_s
        self.polls: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-health", daemon=True)

    def start(self) -> HealthPoller:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join(CLIENT_TIMEOUT_S + 5)
        return list(self.polls)

    def latest(self) -> str | None:
        return self.polls[-1][1] if self.polls else None

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body = http_json(self.port, "GET", "/api/health", timeout=5.0)
            state = body.get("status", "error") if status in (200, 503) and isinstance(body, dict) else "error"
            self.polls.append((time.monotonic(), state))
            self._stop.wait(self.every_s)
