"""Rollout engines: ``base`` (the engine protocols and the table of engines, imported lazily),
``hf`` (transformers generate), ``vllm_engine`` (colocated vLLM), ``client``
(``rollout.engine=vllm_server``), ``prefetch`` (``rollout.async``),
``server`` (``opsd-mm serve``), ``transport`` (weights over a process group) and ``shared``
(what client and server both need, importable without vLLM).
"""
