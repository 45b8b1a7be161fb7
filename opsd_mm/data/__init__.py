"""Training data: rows -> :class:`~opsd_mm.types.Example`.

``load`` maps rows of a hub id, a local file, a ``save_to_disk`` copy or a synthetic task to
examples (``presets`` and ``preset_rows`` know the real datasets' schemas; ``images`` resolves
relative image paths); ``contamination`` finds rows that match benchmark items; ``tasks`` and
``vl_tasks`` generate the offline synthetic tasks; ``stream`` iterates examples endlessly,
resumably and sharded; ``cli`` is ``opsd-mm data inspect | check``.
"""
