"""The tiny teachers' warm start: causal language-model steps on the tiny corpus.

Used by the tiny builders (:mod:`.text`, :mod:`.vl`) when they build a teacher
(:mod:`.teacher` says why a warm start); the corpus is passed in, so this module imports no
other tiny module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WARM_LR = 3e-3
WARM_BATCH = 16
WARM_LEN = 48  # tokens per sequence
INFO_FILE = "tiny_teacher.json"


def corpus_batches(tokenizer: Any, corpus: Sequence[str], steps: int, seed: int = 0) -> list[Any]:
    """``steps`` batches [WARM_BATCH, WARM_LEN] of token ids: the corpus's lines encoded,
    joined with the ``<|endoftext|>`` id and cut into sequences, in an order drawn from
    ``seed``."""
    import torch

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for line in corpus:
        ids += tokenizer(line, add_special_tokens=False)["input_ids"] + [eos]
    n_seq = len(ids) // WARM_LEN
    seqs = torch.tensor(ids[: n_seq * WARM_LEN]).view(n_seq, WARM_LEN)
    order = torch.randperm(n_seq, generator=torch.Generator().manual_seed(seed))
    return [seqs[order[(i * WARM_BATCH + torch.arange(WARM_BATCH)) % n_seq]] for i in range(steps)]


def lm_warm_start(
    model: Any, tokenizer: Any, corpus: Sequence[str], steps: int
) -> dict[str, float]:
    """``steps`` AdamW steps of next-token cross-entropy on ``corpus``, all parameters (text
    only: a VL model's vision tower gets no gradient); the model is left in eval mode. Returns
    the steps and the first and last step's loss."""
    import torch

    batches = corpus_batches(tokenizer, corpus, steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=WARM_LR)
    model.train()
    losses = []
    for ids_BT in batches:
        loss = model(input_ids=ids_BT, labels=ids_BT, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}


def write_info(out_dir: Path, info: dict[str, Any]) -> None:
    """Record the warm start beside the weights (``tiny_teacher.json``)."""
    (Path(out_dir) / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
