"""Training: ``build`` (config -> model, processor, data, engine, trainer, in one path),
``trainer`` (the loop), ``batches`` (a step's rollouts, pairs and micro-batches), ``state``
(save, resume, recorded settings), ``signals``, ``checkpoint``, ``run_dir``, ``distributed``,
``metrics``, ``samples``, ``plot``, ``prompt_cache`` and ``view_gain`` (the teacher's gain from its
image view, VA-OPD's weighting).
"""
