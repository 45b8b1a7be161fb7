"""The loss: ``micro_batch`` (the one entry point the trainer calls), ``modes`` (the table of
divergence modes), ``divergences`` (the naive reference on logits), ``closed_form`` (the
modes' logit gradients), ``fused`` (the chunked path from hidden states), ``kernel`` and
``triton_divergence`` (``loss.kernel``: the fused path's chunks as our Triton kernel),
``importance`` (truncated importance weights), ``policy_gradient`` and ``rewards`` (the reward
beside the teacher).
"""
