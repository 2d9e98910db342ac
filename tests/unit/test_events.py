"""The prediction stream's Ray-free parts (ml.serving.events): SSE framing, event ids, the hub's buffer
and the replay a reconnecting client gets (stored history + buffer, no duplicates, id order, at most
stream.replay_limit per pair); and the stream's end before Serve's request timeout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ml.serving.events import (
    EventBuffer,
    event_ids,
    first_event_id,
    history_events,
    parse_event_id,
    replay,
    sse_comment,
    sse_event,
    sse_retry,
)
from ml.serving.history import history_record

REPO = Path(__file__).resolve().parents[2]


def parse_sse(raw: bytes) -> list[dict]:
    """A minimal EventSource parser (the WHATWG rules this service relies on): blocks end with a blank
    line; `field: value`; lines starting with ':' are comments."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        msg: dict = {"comments": []}
        for line in block.split("\n"):
            if line.startswith(":"):
                msg["comments"].append(line[1:].strip())
                continue
            field, _, value = line.partition(":")
            msg[field] = value[1:] if value.startswith(" ") else value
        out.append(msg)
    return out


def ev(eid: int, pair: str = "BTC", **data) -> dict:
    return {"id": eid, "pair": pair, "data": {"pair": pair, "prediction": {"asOf": eid}, **data}}


# ------------------------------------------------------------------------------------------ framing


def test_an_event_is_id_event_and_one_data_line_then_a_blank_line():
    body = {"pair": "BTC", "prediction": {"probability": 0.61, "reason": "two\nlines"}, "cached": False}
    data = json.dumps(body, separators=(",", ":")).encode()
    raw = sse_event(1764590000123, data)
    assert raw == b"id: 1764590000123\nevent: prediction\ndata: " + data + b"\n\n"
    (msg,) = parse_sse(raw)
    assert msg["id"] == "1764590000123" and msg["event"] == "prediction"
    assert json.loads(msg["data"]) == body  # an escaped newline inside JSON stays inside the one line


def test_data_with_a_raw_newline_is_refused():
    with pytest.raises(ValueError):
        sse_event(1, b'{"a":\n1}')


def test_comments_and_retry_are_what_eventsource_ignores_or_obeys():
    raw = sse_retry(1000) + sse_comment("heartbeat") + sse_comment("stream ends\nafter 50s") + sse_event(5, b"{}")
    msgs = parse_sse(raw)
    assert msgs[0]["retry"] == "1000"
    assert msgs[1] == {"comments": ["heartbeat"]}
    assert msgs[2] == {"comments": ["stream ends after 50s"]}  # a comment never spills into a field
    assert msgs[3]["id"] == "5" and msgs[3]["data"] == "{}"


# ------------------------------------------------------------------------------------------ ids


@pytest.mark.parametrize("raw, expected", [(None, None), ("", None), ("   ", None), ("0", 0), (" 42 ", 42),
                                           ("1764590000123", 1764590000123)])
def test_last_event_id_parses_decimal_digits(raw, expected):
    assert parse_event_id(raw) == expected


@pytest.mark.parametrize("raw", ["abc", "-1", "+1", "1.5", "1e3", "0x10", "１２", "١٢", "1 2", "9" * 19])
def test_a_malformed_last_event_id_is_an_error(raw):
    with pytest.raises(ValueError, match="Last-Event-ID"):
        parse_event_id(raw)


def test_ids_follow_the_clock_and_stay_strictly_increasing():
    assert first_event_id(None, 1_000) == 1_000
    assert first_event_id(500, 1_000) == 1_000            # behind the clock: the clock
    assert first_event_id(1_003, 1_000) == 1_004          # a burst within one ms: last + 1
    ids = event_ids(1_000, ["XMR", "BTC", "ETH", "BTC"])
    assert ids == {"BTC": 1_000, "ETH": 1_001, "XMR": 1_002}  # one per pair, in pair order
    nxt = first_event_id(max(ids.values()), 1_000)
    assert nxt == 1_003 and min(event_ids(nxt, ["BTC"]).values()) > max(ids.values())


# ------------------------------------------------------------------------------------------ buffer


def test_the_buffer_keeps_the_newest_and_knows_what_it_dropped():
    buf = EventBuffer(3)
    assert buf.last_id is None and buf.after(0) == [] and not buf.missed(0)
    assert buf.add([ev(3, "ETH"), ev(1), ev(2)]) == 3  # sorted on the way in
    assert [e["id"] for e in buf.after(0)] == [1, 2, 3]
    assert buf.add([ev(2), ev(3)]) == 0  # repeated or older ids are not added again
    buf.add([ev(4), ev(5, "ETH")])
    assert len(buf) == 3 and [e["id"] for e in buf.after(0)] == [3, 4, 5]
    assert buf.evicted_id == 2 and buf.missed(1) and not buf.missed(2) and not buf.missed(4)
    assert [e["id"] for e in buf.after(3)] == [4, 5]
    assert [e["id"] for e in buf.after(0, {"ETH"})] == [3, 5]
    assert buf.after(5) == [] and buf.last_id == 5


# ------------------------------------------------------------------------------------------ replay


def _stored(eid: int, pair: str = "BTC") -> dict:
    body = ev(eid, pair)["data"]
    pred = {"direction": "up", "probability": 0.6, "modelType": "lstm", "asOf": eid}
    return history_record(pair, pred, False, eid + 3, event_id=eid, event_data=body)


def test_close_events_are_read_back_from_history_records():
    served = history_record("BTC", {"direction": "up", "probability": 0.6}, True, 10)
    assert "eventId" not in served and "eventData" not in served  # a served answer is no event
    records = [_stored(12), served, _stored(11), _stored(9)]
    got = history_events(records, 10)
    assert [e["id"] for e in got] == [12, 11] and got[0] == {"id": 12, "pair": "BTC", "data": ev(12)["data"]}
    assert history_events([{**_stored(13), "eventId": True}, {**_stored(14), "eventData": None}], 0) == []


def test_replay_merges_history_and_buffer_without_duplicates_in_id_order():
    history = history_events([_stored(i, p) for i, p in [(10, "BTC"), (11, "ETH"), (12, "BTC"), (13, "ETH")]], 0)
    buffered = [ev(12), ev(13, "ETH"), ev(14), ev(15, "ETH")]  # the buffer overlaps the history
    out = replay(history, buffered, 10, None, 1000)
    assert [(e["id"], e["pair"]) for e in out] == [(11, "ETH"), (12, "BTC"), (13, "ETH"), (14, "BTC"),
                                                    (15, "ETH")]
    assert len({e["id"] for e in out}) == len(out)
    assert replay(history, buffered, 15, None, 1000) == []
    assert [e["id"] for e in replay(history, buffered, 0, {"ETH"}, 1000)] == [11, 13, 15]


def test_replay_keeps_at_most_the_newest_limit_per_pair():
    history = history_events([_stored(i, "BTC" if i % 2 else "ETH") for i in range(1, 21)], 0)
    out = replay(history, [], 0, None, 3)
    assert [(e["id"], e["pair"]) for e in out] == [(15, "BTC"), (16, "ETH"), (17, "BTC"), (18, "ETH"),
                                                    (19, "BTC"), (20, "ETH")]


# ------------------------------------------------------------------------------------------ config


def test_a_stream_ends_before_serve_would_cut_it():
    """Serve's proxy applies http_options.request_timeout_s to the whole response, a stream included
    (it then stops sending mid-stream); the stream ends cleanly before that (its long polls are cut
    to the time left, so a few seconds of margin are enough)."""
    from ml.config import Settings

    serve_cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    timeout = float(serve_cfg["http_options"]["request_timeout_s"])
    s = Settings.model_validate(yaml.safe_load((REPO / "configs" / "default.yaml").read_text()))
    assert s.stream.max_duration_s <= timeout - 5
