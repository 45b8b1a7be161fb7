"""The teacher: ``weights`` (which weights score: fixed, live, EMA) and ``scoring`` (scored
elsewhere, by a :class:`~opsd_mm.rollout.base.ScoringEngine`).
"""
