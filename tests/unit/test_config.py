"""Settings: YAML defaults, TBML_* overrides, and clear errors for typos."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from ml.config import load_settings


def test_defaults_come_from_yaml():
    s = load_settings(environ={})
    assert s.pairs == ["BTC", "ETH", "XMR", "RVN"]
    assert s.timeframe_ms == 300_000
    assert s.cache.predictions_ttl_s == 30
    assert s.queue.max_concurrent == 1
    assert s.model.profiles["full"].seq_len == 60


def test_env_overrides_nested_and_aliases(tmp_path: Path):
    env = {
        "TBML_DATA_DIR": str(tmp_path),
        "TBML_QUEUE__MAX_CONCURRENT": "3",
        "TBML_PAIRS": "[BTC, ETH]",
        "TBML_REDIS_URL": "redis://127.0.0.1:7000/0",
        "TBML_DATA__SYNTHETIC__SIGNAL_STRENGTH": "0",
        "UNRELATED": "x",
    }
    s = load_settings(environ=env)
    assert s.data_dir == tmp_path
    assert s.queue.max_concurrent == 3
    assert s.pairs == ["BTC", "ETH"]
    assert s.redis.url == "redis://127.0.0.1:7000/0"
    assert s.data.synthetic.signal_strength == 0.0


def test_unknown_key_is_an_error():
    with pytest.raises(ValidationError, match="max_concurent"):
        load_settings(environ={"TBML_QUEUE__MAX_CONCURENT": "2"})


def test_bad_values_are_errors():
    with pytest.raises(ValidationError):
        load_settings(environ={"TBML_TIMEFRAME": "7m"})
    with pytest.raises(ValidationError):
        load_settings(environ={"TBML_DATA__SOURCE": "ftp"})


def test_alternative_config_file(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("pairs: [XMR]\nqueue: {cooldown_minutes: 1}\n")
    s = load_settings(environ={"TBML_CONFIG": str(f)})
    assert s.pairs == ["XMR"]
    assert s.queue.cooldown_minutes == 1
    assert s.cache.features_ttl_s == 300  # untouched defaults remain
