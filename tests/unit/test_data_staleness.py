"""Predictions on old candles say so: `stale: true`, `reason: "data"` once the newest candle closed more
than `data.max_lag_bars` bars ago, whatever the data source (a files store that is not refreshed
ages; the synthetic source always ends at the last closed bar). Ray-free: the rule and the marking
the ingress applies to every answer, with the clock injected.
"""

from __future__ import annotations

import numpy as np

from ml.config import load_settings
from ml.serving.prediction import fallback_prediction, model_prediction, with_data_lag
from ml.serving.signals import classify, data_is_stale

TF = 300_000
AS_OF = 1_767_225_600_000  # close time of the newest candle used


def test_the_rule_counts_bars_since_the_newest_candle_closed():
    assert not data_is_stale(AS_OF, AS_OF, TF, 2)
    assert not data_is_stale(AS_OF, AS_OF + 2 * TF, TF, 2)       # exactly the allowed lag
    assert data_is_stale(AS_OF, AS_OF + 2 * TF + 1, TF, 2)
    assert data_is_stale(AS_OF, AS_OF + 90 * 86_400_000, 3_600_000, 2)  # months-old 1h file
    assert not data_is_stale(AS_OF, AS_OF + 10 * 3_600_000, 3_600_000, 10)
    assert not data_is_stale(AS_OF, AS_OF + 10**12, TF, 0)       # 0 switches the check off
    assert not data_is_stale(None, AS_OF, TF, 2)                 # no candles: the fallback says so


def test_the_default_lag_is_two_bars_and_env_overrides_it():
    assert load_settings(environ={}).data.max_lag_bars == 2
    assert load_settings(environ={"TBML_DATA__MAX_LAG_BARS": "5"}).data.max_lag_bars == 5


def _model_answer(stale: bool = False) -> dict:
    from ml.features import FEATURE_NAMES

    return model_prediction(classify(0.8), model_type="lstm", version="v1", horizon=5, as_of=AS_OF,
                            timeframe_ms=TF, stale=stale, last=np.zeros(len(FEATURE_NAMES), dtype=np.float32))


def test_a_model_answer_on_old_candles_is_marked_stale_with_reason_data():
    fresh = _model_answer()
    assert with_data_lag(fresh, AS_OF + TF, TF, 2) is fresh      # within the lag: untouched
    old = with_data_lag(fresh, AS_OF + 3 * TF, TF, 2)
    assert old["stale"] is True and old["reason"] == "data" and old["fallback"] is False
    assert fresh["stale"] is False and "reason" not in fresh     # a cached answer is never mutated
    assert old["signal"] == fresh["signal"] and old["asOf"] == AS_OF  # the answer itself is kept
    # a model that is stale by age and on old data: the data is the reason
    assert with_data_lag(_model_answer(stale=True), AS_OF + 3 * TF, TF, 2)["reason"] == "data"


def test_fallbacks_keep_their_own_reason():
    fb = fallback_prediction(model_type="lstm", version=None, horizon=5, reason="no model", as_of=AS_OF,
                             timeframe_ms=TF)
    assert with_data_lag(fb, AS_OF + 100 * TF, TF, 2) is fb
