"""Storage logic on the shared volume: atomic writes, layout, histories (plain Python, no Ray).

- atomic.py      the one atomic-write implementation (checksummed JSON documents, one backup generation)
- paths.py       the layout and `safe_path`, the one function that turns names into paths
- store.py       `Storage`: documents, model versions, training and prediction history, maintenance
- predictions.py batched prediction history in immutable segment files
- models.py      model versions (weights + meta.json written last) and the production pointer
- doctor.py      `tbml storage doctor [--repair]`

The Storage actor (actors/storage.py) is the only writer; other processes use `Storage.reader()`.
"""
