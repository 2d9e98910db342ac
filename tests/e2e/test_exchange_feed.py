"""The market feed on a running service with `data.source: exchange`, like a user: `tbml up --detach
--no-train` against the stand-in Binance (`standins.binance`, real HTTP; the service's real ccxt client
pointed at it by `data.exchange.base_url`), 1-second candles so one closes every second, and a production
model registered before the start (trained on the stand-in's candles).

- a candle the stand-in starts serving (its `serve_until` raised) shows up in the store and in the next
  prediction's `asOf`, without a restart;
- the stand-in stopped: /api/health shows the lag and the error, predictions turn `stale` with reason
  "data" once the lag passes data.max_lag_bars, and no request fails;
- the stand-in back (same port): the gap is backfilled, the store has every bar in order.
Then the same service on `data.source: files` (nothing refreshes the store): predictions say `stale`,
reason "data", and health shows the lag.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(REPO), str(HERE), str(REPO / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from polling import wait_for  # noqa: E402
from standins.binance import StandIn, kline  # noqa: E402
from test_up_down import Service, _get  # noqa: E402 - the shared `tbml` harness

PAIR = "BTC"
TF = 1_000
MAX_LAG = 3
FEED_ENV = {  # 1 s candles; a feed that asks soon after a close and retries quickly (limits, not timings)
    "TBML_TIMEFRAME": "1s", "TBML_PAIRS": f"[{PAIR}]", "TBML_DATA__SOURCE": "exchange",
    "TBML_DATA__EXCHANGE__HISTORY_BARS": "1500", "TBML_DATA__EXCHANGE__RETRIES": "0",
    "TBML_DATA__EXCHANGE__TIMEOUT_S": "2", "TBML_DATA__FEED__CLOSE_DELAY_S": "0.2",
    "TBML_DATA__FEED__RETRY_S": "0.5", "TBML_DATA__MAX_LAG_BARS": str(MAX_LAG),
}


def _pretrain(data_dir: Path, end_ts: int) -> str:
    """A production lstm of PAIR on the stand-in's candles (1500 bars up to end_ts), before the start."""
    from ml.data.exchange import rows_to_frame
    from ml.registry.versions import Registry
    from ml.storage.store import Storage
    from ml.training.config import TrainConfig
    from ml.training.local import train_local

    candles = rows_to_frame([kline(end_ts - i * TF, TF)[:6] for i in range(1499, -1, -1)])
    cfg = TrainConfig.from_settings(PAIR, "lstm", epochs=1, bars=1500, seed=7, threads=1)
    result = train_local(cfg, candles)
    with Storage(data_dir) as storage:
        version = Registry(storage).register(PAIR, result)["version"]
        storage.set_production(PAIR, "lstm", version, "test fixture")
    return version


class Running:
    def __init__(self, svc: Service, stand_in: StandIn, version: str) -> None:
        self.svc, self.stand_in, self.version = svc, stand_in, version
        self.base = f"http://127.0.0.1:{svc.ports['http']}"
        self.answers: list[int] = []

    def get(self, path: str) -> dict:
        code, body = _get(self.base + path, timeout=30)
        self.answers.append(code)
        assert code == 200, (path, code, body[:500])
        return json.loads(body)

    def predict(self) -> dict:
        return self.get(f"/api/predictions/{PAIR}")["prediction"]

    def health(self) -> dict:
        code, body = _get(self.base + "/api/health", timeout=30)
        assert code in (200, 503), (code, body[:300])
        return json.loads(body)

    def store(self):
        from ml.data.store import CandleStore

        return CandleStore(self.svc.data_dir, "1s")


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from ml.clock import last_closed_bar_ts

    start = last_closed_bar_ts(TF)
    stand_in = StandIn(interval="1s", symbols={"BTCUSDT": ("BTC", "USDT")}, serve_until=start)
    svc = Service(tmp_path_factory.mktemp("exchange-feed"), auth=False)
    svc.env.update(FEED_ENV, TBML_DATA__EXCHANGE__BASE_URL=stand_in.url)
    svc.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        version = _pretrain(svc.data_dir, start - 600 * TF)
        proc = svc.up()
        assert proc.returncode == 0, f"tbml up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        run = Running(svc, stand_in, version)
        wait_for(lambda: _get(run.base + "/api/ping")[0] == 200, 60, "the API answers")
        run.start = start
        yield run
    finally:
        svc.cleanup()
        stand_in.stop()


def test_new_candles_reach_the_store_and_the_next_prediction_without_a_restart(running):
    run = running
    start = run.start
    cov = run.store().coverage(PAIR)
    assert cov == {"bars": 1500, "start": start - 1499 * TF, "end": start}, cov  # the backfill of tbml up
    first = run.predict()
    assert not first["fallback"] and first["modelVersion"] == run.version, first
    assert first["asOf"] == start + TF  # the close of the newest candle the exchange served

    run.stand_in.serve_until = start + 3 * TF  # three more candles are printed
    wait_for(lambda: run.store().coverage(PAIR)["end"] == start + 3 * TF, 30, "the feed to store the new candles")
    p = wait_for(lambda: (p := run.predict())["asOf"] == start + 4 * TF and p, 30, "a prediction on the new candle")
    assert not p["fallback"] and p["modelVersion"] == run.version

    run.stand_in.serve_until = None  # the exchange follows the clock again
    fresh = wait_for(lambda: (p := run.predict())["stale"] is False and p, 30, "a prediction on current candles")
    assert fresh.get("reason") != "data", fresh
    assert run.stand_in.hits["/api/v3/exchangeInfo"] == 1  # one kept client: markets loaded once
    healthy = wait_for(lambda: (h := run.health())["components"]["dataSource"]["status"] == "healthy" and h, 30,
                    "dataSource healthy")
    btc = healthy["components"]["dataSource"]["pairs"][PAIR]
    assert btc["source"] == "exchange" and btc["lagBars"] <= MAX_LAG and btc["failures"] == 0, btc
    assert healthy["components"]["dataSource"]["sourceReachable"] is True
    hub = run.svc.status()["live"]["feed"]["eventsHub"]  # the feed told the events hub of the closes
    assert hub["notified"] >= 1 and set(hub["lastCloses"]) == {PAIR}, hub


def test_exchange_down_shows_lag_and_error_predictions_stale_then_the_gap_is_backfilled(running):
    run = running
    before = len(run.answers)
    stopped_end = run.store().coverage(PAIR)["end"]
    run.stand_in.stop()

    def down_seen():
        run.predict()
        h = run.health()
        btc = h["components"]["dataSource"]["pairs"][PAIR]
        return h["status"] == "degraded" and btc["lastError"] and btc["lagBars"] > MAX_LAG and h

    from deployments.schemas import DataSourceHealth

    h = wait_for(down_seen, 60, "health to show the lag and the error")
    src = h["components"]["dataSource"]
    DataSourceHealth.model_validate(src)
    assert src["status"] == "degraded" and src["sourceReachable"] is False and PAIR in src["failingPairs"], src
    assert "ExchangeUnavailableError" in src["pairs"][PAIR]["lastError"], src["pairs"][PAIR]
    stale = wait_for(lambda: (p := run.predict())["stale"] and p, 30, "predictions stale on old candles")
    assert stale["reason"] == "data" and not stale["fallback"] and stale["modelVersion"] == run.version, stale
    assert stale["asOf"] <= stopped_end + 10 * TF
    gap_end = run.store().coverage(PAIR)["end"]

    run.stand_in.start()  # back on the same port
    wait_for(lambda: run.store().coverage(PAIR)["end"] >= gap_end + 3 * TF, 30, "the gap backfilled")
    ts = run.store().read(PAIR)["ts"].to_numpy()
    assert np.all(np.diff(ts) == TF), "the store misses bars or is out of order"
    assert ts[0] == run.start - 1499 * TF
    wait_for(lambda: run.predict()["stale"] is False, 30, "fresh predictions again")
    wait_for(lambda: run.health()["components"]["dataSource"]["status"] == "healthy", 30, "dataSource healthy")
    assert set(run.answers[before:]) == {200}  # no request failed


def test_files_source_predictions_say_stale_data(running):
    """The same data directory served with `data.source: files`: nothing refreshes the store."""
    run = running
    svc = run.svc
    down = svc.tbml("down", timeout=240)
    assert down.returncode == 0, down.stderr
    run.stand_in.stop()
    svc.env.update(TBML_DATA__SOURCE="files")
    proc = svc.up()
    assert proc.returncode == 0, f"tbml up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    wait_for(lambda: _get(run.base + "/api/ping")[0] == 200, 60, "the API answers")
    end = run.store().coverage(PAIR)["end"]
    p = wait_for(lambda: (p := run.predict())["stale"] and p, 30, "a stale prediction")
    assert p["reason"] == "data" and not p["fallback"] and p["asOf"] == end + TF, p
    src = run.health()["components"]["dataSource"]
    assert src["type"] == "files" and src["status"] == "degraded" and src["pairs"][PAIR]["lagBars"] > MAX_LAG, src
    assert src["pairs"][PAIR]["lastError"] is None  # nothing was fetched: old, not failing
