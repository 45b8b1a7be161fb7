"""How many fp32 [chunk, V] buffers the fused loss keeps alive at once, per mode: closed-form
chunk gradients (the default on the full vocabulary) vs autograd through token_divergence.

    .venv/bin/python bench/chunk_working_set.py            # V=151,936, 2 chunks of 208 tokens

Counts live tensor bytes with bench/live_bytes.py (the CPU analog of CUDA's
max_memory_allocated) over a whole forward + backward of ``fused_divergence``, and divides by
the bytes of one fp32 [chunk, V] buffer. The working set is what sets the GPU peak at long
rollouts (N tokens only add [N, H]-sized buffers), so this predicts it without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

MODES = ("jsd", "forward_kl", "reverse_kl", "sampled_pg")


def working_set(dtype, mode, closed_form, args) -> tuple[float, float]:
    from live_bytes import LiveBytes

    from opsd_mm.config import LossConfig
    from opsd_mm.loss.fused import fused_divergence

    g = torch.Generator().manual_seed(0)
    n = 2 * args.chunk
    h = torch.randn(n, args.hidden, generator=g).to(dtype).requires_grad_()
    ht = h.detach() + torch.randn(n, args.hidden, generator=g).to(dtype)
    w = (torch.randn(args.vocab, args.hidden, generator=g) * 2 / args.hidden**0.5).to(dtype)
    ids = torch.randint(0, args.vocab, (n,), generator=g)
    cfg = LossConfig(divergence=mode)
    with LiveBytes() as live:
        loss, _ = fused_divergence(
            h, ht, w, ids, cfg, scale=1 / n, chunk_size=args.chunk, closed_form=closed_form
        )
        loss.backward()
    return live.peak / (args.chunk * args.vocab * 4), float(loss.detach())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=256, help="small: the matmuls do not matter")
    p.add_argument("--chunk", type=int, default=208, help="tokens per chunk (2 chunks run)")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(
        f"V={args.vocab} H={args.hidden} chunk={args.chunk}: peak live tensors, in fp32 [chunk, V]"
    )
    print(f"{'weights':9s} {'mode':11s} {'autograd':>9s} {'closed':>7s} {'ratio':>6s}")
    for dtype in (torch.float32, torch.bfloat16):
        for mode in MODES:
            auto, loss_a = working_set(dtype, mode, False, args)
            closed, loss_c = working_set(dtype, mode, True, args)
            assert abs(loss_a - loss_c) <= 1e-4 * max(abs(loss_a), 1e-6), (loss_a, loss_c)
            name = str(dtype).removeprefix("torch.")
            print(f"{name:9s} {mode:11s} {auto:9.2f} {closed:7.2f} {closed / auto:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
