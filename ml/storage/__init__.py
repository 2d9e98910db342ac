"""Storage on the shared volume (plain Python, no Ray; imports ml.clock, ml.config and ml.pairs only).

- atomic.py      the one atomic-write implementation (checksummed JSON documents, one backup generation)
- paths.py       the layout and `safe_path`, the one function that turns names into paths
- store.py       `Storage`: documents, model versions, training and prediction history, maintenance
- predictions/   batched prediction history in immutable segment files (segments, log, maintenance)
- models.py      model versions (weights + meta.json written last) and the production pointer
- doctor.py      `tbml storage doctor [--repair]`: checks a data directory (given its path and ModelStore)

The Storage actor (actors/storage.py) is the only writer; other processes use `Storage.reader()`.
"""
