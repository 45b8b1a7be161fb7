"""Training: ``build`` (config -> model, processor, data, engine, trainer, in one path),
``trainer`` (the loop), ``batches`` (a step's rollouts, pairs and micro-batches), ``state``
(save, resume, recorded settings), ``signals``, ``checkpoint``, ``run_dir``, ``distributed``,
``metrics``, ``samples``, ``plot`` and ``prompt_cache``.
"""
