"""Storage logic on the shared volume: atomic writes, layout, histories (plain Python, no Ray)."""
