"""The prediction stream on a running service: `tbml up --detach --no-train` on 1-second candles (a candle
closes every second) from the stand-in Binance (`standins.binance`, real HTTP; the service's ccxt client
pointed at it by `data.exchange.base_url`; the synthetic market simulates from its 2025 origin, too far
for 1-second bars), a model of BTC trained before the start, and clients of
`GET /api/stream/predictions` over the real Serve proxy.

- an observer subscribed the whole time (reconnecting with Last-Event-ID whenever a stream ends, as
  EventSource does; streams end after TBML_STREAM__MAX_DURATION_S here, as they end before Serve's
  request timeout in production) receives one event per pair per candle close, each id once and in
  order, heartbeats in between, and the same prediction as `GET /api/predictions/{pair}`, which is
  then a cache hit;
- a client that leaves and comes back with Last-Event-ID is replayed exactly the events it missed
  (more than the hub keeps in memory, so the older ones come from the stored history);
- a malformed pair list or event id is a 422 JSON, an unknown pair a 404, before anything is streamed;
- the events hub killed (its process; Ray restarts it): the stream goes on, ids keep growing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(REPO), str(HERE), str(REPO / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from polling import wait_for  # noqa: E402
from standins.binance import StandIn, kline  # noqa: E402
from test_up_down import Service, _get  # noqa: E402 - the shared `tbml` harness

PAIRS = ("BTC", "ETH")
TF = 1_000
MAX_DURATION_S = 6
STREAM_ENV = {
    "TBML_TIMEFRAME": "1s",
    "TBML_PAIRS": json.dumps(list(PAIRS)),
    "TBML_DATA__SOURCE": "exchange",
    "TBML_DATA__EXCHANGE__HISTORY_BARS": "1500",
    "TBML_DATA__EXCHANGE__TIMEOUT_S": "2",
    "TBML_DATA__FEED__RETRY_S": "0.5",
    "TBML_DATA__MAX_LAG_BARS": "60",          # a loaded machine must not turn 1-second candles stale
    "TBML_DATA__FEED__CLOSE_DELAY_S": "0.2",
    "TBML_STREAM__HEARTBEAT_S": "0.4",
    "TBML_STREAM__MAX_DURATION_S": str(MAX_DURATION_S),
    "TBML_STREAM__BUFFER_EVENTS": "6",        # three closes of two pairs: a longer absence reads the history
}


def _pretrain(data_dir: Path, end_ts: int) -> str:
    """A production lstm of BTC on the stand-in's candles, registered before the start."""
    from ml.data.exchange import rows_to_frame
    from ml.registry.versions import Registry
    from ml.storage.store import Storage
    from ml.training.config import TrainConfig
    from ml.training.local import train_local

    candles = rows_to_frame([kline(end_ts - i * TF, TF)[:6] for i in range(1499, -1, -1)])
    cfg = TrainConfig.from_settings("BTC", "lstm", epochs=1, bars=1500, seed=7, threads=1)
    result = train_local(cfg, candles)
    with Storage(data_dir) as storage:
        version = Registry(storage).register("BTC", result)["version"]
        storage.set_production("BTC", "lstm", version, "test fixture")
    return version


def read_stream(url: str, *, last_id: str | None = None, stop=None, timeout_s: float = 20.0):
    """Yield the messages of one stream: ("event", {"id", "data"}), ("comment", text), ("retry", ms), and
    ("end", None) when the server ended it. `stop()` true: leave (the client goes away)."""
    import httpx

    headers = {"Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(timeout_s)) as r:
        assert r.status_code == 200, (r.status_code, r.read()[:500])
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        msg: dict = {}
        for line in r.iter_lines():
            if line == "":
                if "data" in msg:
                    yield "event", {"id": int(msg["id"]), "event": msg.get("event"), "data": json.loads(msg["data"])}
                elif "retry" in msg:
                    yield "retry", int(msg["retry"])
                msg = {}
            elif line.startswith(":"):
                yield "comment", line[1:].strip()
            else:
                field, _, value = line.partition(":")
                msg[field] = value[1:] if value.startswith(" ") else value
            if stop is not None and stop():
                return
    yield "end", None


class Observer(threading.Thread):
    """A subscriber for the whole module that reconnects with the last id it saw, as EventSource does."""

    def __init__(self, url: str) -> None:
        super().__init__(name="stream-observer", daemon=True)
        self.url = url
        self.stopping = threading.Event()
        self.events: list[dict] = []
        self.heartbeats = 0
        self.clean_ends = 0
        self.connections = 0
        self.errors: list[str] = []
        self.received_ms: dict[int, float] = {}  # event id -> when it arrived (wall clock, ms)

    def run(self) -> None:
        while not self.stopping.is_set():
            last = str(self.events[-1]["id"]) if self.events else None
            self.connections += 1
            try:
                ending = False
                for kind, value in read_stream(self.url, last_id=last, stop=self.stopping.is_set):
                    if kind == "event":
                        self.events.append(value)
                        self.received_ms[value["id"]] = time.time() * 1000
                    elif kind == "comment":
                        self.heartbeats += value == "heartbeat"
                        ending = value.startswith("stream ends")
                    elif kind == "end":
                        self.clean_ends += ending
            except Exception as exc:  # noqa: BLE001 - kept and asserted on; reconnect like EventSource
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                self.stopping.wait(1.0)

    def after(self, eid: int) -> list[dict]:
        return [e for e in list(self.events) if e["id"] > eid]

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from ml.clock import last_closed_bar_ts

    stand_in = StandIn(interval="1s", symbols={"BTCUSDT": ("BTC", "USDT"), "ETHUSDT": ("ETH", "USDT")})
    svc = Service(tmp_path_factory.mktemp("stream"), auth=False)
    svc.env.update(STREAM_ENV, TBML_DATA__EXCHANGE__BASE_URL=stand_in.url)
    svc.data_dir.mkdir(parents=True, exist_ok=True)
    observer = None
    try:
        version = _pretrain(svc.data_dir, last_closed_bar_ts(TF) - 600 * TF)
        up = svc.up()
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        base = f"http://127.0.0.1:{svc.ports['http']}"
        observer = Observer(f"{base}/api/stream/predictions")
        observer.start()
        yield {"svc": svc, "base": base, "version": version, "observer": observer}
    finally:
        if observer is not None:
            observer.stop()
        svc.cleanup()
        stand_in.stop()


def test_one_event_per_pair_per_close_with_the_served_prediction(service):
    obs, base = service["observer"], service["base"]
    wait_for(lambda: all(sum(e["data"]["pair"] == p for e in obs.events) >= 8 for p in PAIRS), 120,
          "events of both pairs on the stream")
    events = list(obs.events)
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids)), "each id once, in order (across reconnects too)"
    assert {e["event"] for e in events} == {"prediction"}
    as_of = {p: [e["data"]["prediction"]["asOf"] for e in events if e["data"]["pair"] == p] for p in PAIRS}
    for pair, times in as_of.items():
        assert times == sorted(set(times)), f"{pair}: one event per candle close: {times}"
        assert all((b - a) % 1000 == 0 for a, b in zip(times, times[1:], strict=False)), times
    common = set(as_of["BTC"]) & set(as_of["ETH"])
    assert len(common) >= 0.8 * min(len(t) for t in as_of.values()), as_of  # a close is one for every pair
    btc = [e for e in events if e["data"]["pair"] == "BTC"]
    assert all(not e["data"]["prediction"]["fallback"] for e in btc), btc[-1]
    assert {e["data"]["prediction"]["modelVersion"] for e in btc} == {service["version"]}
    assert all(e["data"]["prediction"]["fallback"] for e in events if e["data"]["pair"] == "ETH")  # no model

    # a client asking after the close gets what the stream sent, from the cache
    def same_as_served():
        last = [e for e in obs.events if e["data"]["pair"] == "BTC"][-1]
        code, body = _get(f"{base}/api/predictions/BTC", timeout=10)
        served = json.loads(body) if code == 200 else {}
        if served.get("prediction", {}).get("asOf") != last["data"]["prediction"]["asOf"]:
            return None  # the next candle closed in between: try the next event
        return last, served

    event, served = wait_for(same_as_served, 60, "a GET answering the candle of the newest event", interval=0.05)
    assert served["prediction"] == event["data"]["prediction"], (served, event)
    assert served["cached"] is True and event["data"]["cached"] is False, (served, event)

    assert obs.heartbeats >= 1, "heartbeats between closes"
    wait_for(lambda: obs.clean_ends >= 1, 3 * MAX_DURATION_S, "a stream ended by the server")
    assert obs.connections >= 2 and not obs.errors, (obs.connections, obs.errors)
    # observed, not asserted: candle close (asOf) -> event delivered, live events only (not replays)
    import numpy as np

    lag = [obs.received_ms[e["id"]] - e["data"]["prediction"]["asOf"] for e in events
           if e["id"] in obs.received_ms and e["data"]["prediction"]["asOf"]]
    cached = [e["data"]["timestamp"] - e["data"]["prediction"]["asOf"] for e in events]
    print(f"\nstream: {len(events)} events, {obs.heartbeats} heartbeats, {obs.connections} connections, "
          f"{obs.clean_ends} clean ends; asOf steps of BTC (ms): "
          f"{sorted({b - a for a, b in zip(as_of['BTC'], as_of['BTC'][1:], strict=False)})}; "
          f"close -> cached p50 {np.median(cached):.0f} ms, close -> delivered p50 {np.median(lag):.0f} ms, "
          f"p90 {np.percentile(lag, 90):.0f} ms (includes data.feed.close_delay_s = 0.2 s)")


def test_a_reconnect_with_last_event_id_replays_exactly_the_missed_ones(service):
    obs, base = service["observer"], service["base"]
    url = f"{base}/api/stream/predictions"
    first = next(v for kind, v in read_stream(url) if kind == "event")  # then the client goes away
    gone = first["id"]
    # more closes than the hub keeps (TBML_STREAM__BUFFER_EVENTS): the older ones are in the history only
    wait_for(lambda: len(obs.after(gone)) >= 10, 60, "closes while the client is away")
    missed = obs.after(gone)
    got = []
    for kind, value in read_stream(url, last_id=str(gone)):
        if kind == "event":
            got.append(value)
        if len(got) >= len(missed):
            break
    assert [e["id"] for e in got] == [e["id"] for e in missed[:len(got)]]
    assert got == missed[:len(got)], "the replayed events are the ones sent live, body for body"

    # `?lastEventId=` does the same; the header wins over it (EventSource reconnects with its old URL)
    for query, header in ((str(gone), None), ("0", str(gone))):
        head = []
        for kind, value in read_stream(f"{url}?lastEventId={query}", last_id=header):
            if kind == "event":
                head.append(value)
            if len(head) >= 2:
                break
        assert [e["id"] for e in head] == [e["id"] for e in missed[:2]], (query, header, head)

def test_a_bad_pair_or_event_id_is_an_error_before_the_stream(service):
    base = service["base"]
    for path, headers, status, code in (
            ("?pairs=NOPE", {}, 404, "pair_not_found"),            # well-formed, not served: as everywhere
            ("?pairs=BTC,", {}, 422, "validation_error"),
            ("?pairs=BTC;ETH", {}, 422, "validation_error"),
            ("", {"Last-Event-ID": "yesterday"}, 422, "validation_error"),
            ("?lastEventId=-5", {}, 422, "validation_error")):
        got, body = _get(f"{base}/api/stream/predictions{path}", headers=headers, timeout=10)
        assert got == status, (path, headers, got, body[:300])
        err = json.loads(body)
        assert err["error"] == code and err["message"], err
        if code == "pair_not_found":
            assert set(err["availablePairs"]) >= set(PAIRS), err
    # a pair filter gets only that pair
    events = []
    for kind, value in read_stream(f"{base}/api/stream/predictions?pairs=eth"):
        if kind == "event":
            events.append(value)
        if len(events) >= 2 or kind == "end":
            break
    assert events and {e["data"]["pair"] for e in events} == {"ETH"}, events


KILL_HUB = """
import json, sys, time, ray
ray.init(address=sys.argv[1], namespace="tbml", log_to_driver=False)
hub = ray.get_actor("tbml-prediction-events")
before = ray.get(hub.status.remote(), timeout=30)
print(json.dumps(before))
ray.kill(hub, no_restart=False)  # SIGKILL of its process; Ray restarts it
deadline = time.monotonic() + 60
while True:  # the kill is asynchronous: poll until the restarted process answers (it counts from 0)
    try:
        status = ray.get(ray.get_actor("tbml-prediction-events").status.remote(), timeout=5)
    except Exception:
        status = None
    if status is not None and status["closes"] < before["closes"] or time.monotonic() > deadline:
        print(json.dumps(status))
        break
    time.sleep(0.2)
"""


def test_a_killed_events_hub_is_restarted_and_the_stream_goes_on(service):
    obs, svc = service["observer"], service["svc"]
    wait_for(lambda: obs.events, 30, "events before the kill")
    last = obs.events[-1]["id"]
    kill = subprocess.run([sys.executable, "-c", KILL_HUB, svc.state()["ray"]["address"]], cwd="/tmp",
                          env=svc.env, capture_output=True, text=True, timeout=180)
    assert kill.returncode == 0, kill.stderr[-2000:]
    before, status = (json.loads(line) for line in kill.stdout.strip().splitlines()[-2:])
    assert status is not None and status["closes"] < before["closes"], (before, status)  # a new process
    wait_for(lambda: len(obs.after(last)) >= 4 * len(PAIRS), 60, "events once the hub is back")
    events = list(obs.events)
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids)), "ids keep growing across the restart (they follow the clock)"
    for pair in PAIRS:
        mine = [(e["id"], e["data"]["prediction"]["asOf"], e["data"]["timestamp"]) for e in events
                if e["data"]["pair"] == pair]
        times = [t for _, t, _ in mine]
        assert times == sorted(set(times)), (pair, last, [m for m in mine if times.count(m[1]) > 1], mine[-12:])
    assert not obs.errors, obs.errors
    print(f"\nhub restarted: {len(obs.after(last))} events since the kill; status before {before}, after {status}")


KILL_STORAGE = """
import sys, ray
ray.init(address=sys.argv[1], namespace="tbml", log_to_driver=False)
ray.kill(ray.get_actor("tbml-storage"), no_restart=False)  # SIGKILL of its process; Ray restarts it
"""


def test_the_simulated_account_trades_on_the_closes_and_survives_a_storage_restart(service):
    """GET /api/simulations/{pair}: the account that the predictions made at each close trade with
    (ml.simulation) moves on every close; after a SIGKILL of the Storage actor (which keeps it in
    training/{PAIR}/simulation.json) it carries on from where it was, not from an empty account."""
    from deployments.schemas import SimulationResponse

    base, svc = service["base"], service["svc"]
    pair = PAIRS[0]

    def account(min_bars: int):
        code, body = _get(f"{base}/api/simulations/{pair}", timeout=30)
        if code != 200:
            return None
        doc = SimulationResponse.model_validate_json(body)
        return doc if doc.stats.bars >= min_bars else None

    first = wait_for(lambda: account(3), 60, "the simulated account after three closes")
    assert first.since is not None and first.updatedAt is not None
    assert first.config["feeBps"] >= 0 and first.buyAndHold is not None
    kill = subprocess.run([sys.executable, "-c", KILL_STORAGE, svc.state()["ray"]["address"]], cwd="/tmp",
                          env=svc.env, capture_output=True, text=True, timeout=180)
    assert kill.returncode == 0, kill.stderr[-2000:]
    later = wait_for(lambda: account(first.stats.bars + 3), 90, "the account moving on after the Storage restart")
    assert later.since == first.since  # the same account, continued
    assert later.stats.bars >= first.stats.bars + 3
