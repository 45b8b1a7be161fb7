"""Models: ``load`` (checkpoints, LoRA or full fine-tuning, the family checks), ``forward``
(the columns that predict a completion), ``packing`` (padding-free forwards), ``export``
(a checkpoint as a model directory) and ``tiny`` (the offline tiny models and tokenizers that
``model.name_or_path: tiny:<name>`` names).
"""
