"""Path safety: names are validated before they touch a path; nothing escapes the data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ml.pairs import InvalidPairError
from ml.storage.paths import UnsafePathError, safe_path
from ml.storage.store import Storage

BAD_PAIRS = ["../x", "/etc", "BTC/../../x", "ＢＴＣ", "BTC\x00", "btc", "", "..", ".", "BTC\n", "B",
             "BTC ", "BTC/ETH", "C:\\x", "BTC%2F..", "BTС", 42]  # "BTС" has a Cyrillic С
BAD_MODEL_TYPES = ["../lstm", "LSTM", "l", "lstm/x", "ｌｓｔｍ", "lstm\x00", "/lstm", "", "lstm\n", "1lstm"]
BAD_VERSIONS = ["..", ".", "a/b", "../v1", "/v1", "v1\x00", "x" * 65, "a.tmp-b", "v1.bak", "", "v 1", "ｖ1"]
BAD_NAMES = ["../meta.json", "/etc/passwd", ".hidden", "a/b", "x.tmp-1", "w.bak", "", "..", "-rf",
             "weights\x00.pt", "ｗ.pt", "x" * 129]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    s = Storage(tmp_path / "data")
    s.ensure_layout()
    return s


@pytest.mark.parametrize("pair", BAD_PAIRS)
def test_bad_pairs_are_refused_everywhere_and_create_nothing(storage: Storage, pair):
    before = tree(storage.data_dir)
    calls = [
        lambda: safe_path(storage.data_dir, "predictions", pair=pair),
        lambda: storage.append_prediction({"pair": pair, "timestamp": 1}),
        lambda: storage.query_predictions(pair),
        lambda: storage.count_predictions(pair),
        lambda: storage.update_predictions(pair, [{"id": "x", "outcome": 1}]),
        lambda: storage.save_model_version(pair, "lstm", "v1", {}, {"weights.pt": b"w"}),
        lambda: storage.list_versions(pair, "lstm"),
        lambda: storage.set_production(pair, "lstm", "v1", "r"),
        lambda: storage.get_production(pair, "lstm"),
        lambda: storage.read_model_file(pair, "lstm", "v1", "weights.pt"),
        lambda: storage.delete_version(pair, "lstm", "v1"),
        lambda: storage.put_document("features", "latest", {"x": 1}, pair=pair),
        lambda: storage.get_document("features", "latest", pair=pair),
    ]
    for call in calls:
        with pytest.raises(UnsafePathError, match="unsafe|invalid pair"):
            call()
    storage.flush()
    assert tree(storage.data_dir) == before


def test_pair_error_is_also_an_invalid_pair_error(storage: Storage):
    with pytest.raises(InvalidPairError):
        storage.query_predictions("../x")
    for call in (lambda: storage.query_predictions(None), lambda: storage.list_versions(None, "lstm"),
                 lambda: storage.append_prediction({"pair": None, "timestamp": 1})):
        with pytest.raises(UnsafePathError):
            call()


@pytest.mark.parametrize("model_type", BAD_MODEL_TYPES)
def test_bad_model_types(storage: Storage, model_type):
    before = tree(storage.data_dir)
    with pytest.raises(UnsafePathError, match="unsafe model type"):
        storage.save_model_version("BTC", model_type, "v1", {}, {"weights.pt": b"w"})
    with pytest.raises(UnsafePathError):
        storage.list_versions("BTC", model_type)
    assert tree(storage.data_dir) == before


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_bad_versions(storage: Storage, version):
    before = tree(storage.data_dir)
    with pytest.raises(UnsafePathError, match="unsafe version"):
        storage.save_model_version("BTC", "lstm", version, {}, {"weights.pt": b"w"})
    with pytest.raises(UnsafePathError):
        storage.set_production("BTC", "lstm", version)
    assert tree(storage.data_dir) == before


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_file_and_document_names(storage: Storage, name):
    before = tree(storage.data_dir)
    with pytest.raises(UnsafePathError, match="unsafe file name"):
        storage.save_model_version("BTC", "lstm", "v1", {}, {"weights.pt": b"ok", name: b"w"})
    with pytest.raises(UnsafePathError):
        storage.put_document("queue", name, {"x": 1})
    with pytest.raises(UnsafePathError):
        storage.read_model_file("BTC", "lstm", "v1", name)
    assert tree(storage.data_dir) == before  # not even the valid weights.pt was written


@pytest.mark.parametrize("category", ["../x", "/etc", "models/../..", "predictions", "candles", "", "quarantine"])
def test_documents_only_in_document_categories(storage: Storage, category):
    with pytest.raises(UnsafePathError):
        storage.put_document(category, "x", {"x": 1})


def test_symlink_out_of_the_data_dir_is_refused(tmp_path: Path, storage: Storage):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, storage.data_dir / "predictions" / "EVIL")
    with pytest.raises(UnsafePathError, match="outside the data directory"):
        safe_path(storage.data_dir, "predictions", pair="EVIL")
    with pytest.raises(UnsafePathError):
        storage.append_prediction({"pair": "EVIL", "timestamp": 1})
        storage.flush()
    assert list(outside.iterdir()) == []


def test_good_names_build_the_documented_layout(storage: Storage):
    root = storage.data_dir
    assert safe_path(root, "models", pair="BTC", model_type="lstm", version="20240101-1.v2",
                     name="weights.pt") == root / "models/BTC/lstm/20240101-1.v2/weights.pt"
    assert safe_path(root, "candles", pair="ETH", name="5m.parquet") == root / "candles/ETH/5m.parquet"
    assert safe_path(root, "queue", name="state.json") == root / "queue/state.json"
    with pytest.raises(UnsafePathError, match="needs a pair"):
        safe_path(root, "models", model_type="lstm")
