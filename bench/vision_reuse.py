"""Step time with and without vision reuse (VisionCache), measured side by side in one run.

One OPSD-like step = teacher forward (no grad) + student forward and backward of a divergence,
on a tiny Qwen-VL model (random weights, real architecture; vision tower frozen, everything else
trainable) with several 448 x 448 images per example. The two variants alternate step by step,
so machine noise hits both alike; the script prints median step times and their ratio.

    .venv/bin/python bench/vision_reuse.py [--family qwen2.5-vl] [--images 3] [--batch 2]
        [--threads 1] [--vision-width 128 --vision-depth 4]

On a shared CPU prefer ``--threads 1`` (oversubscribed threads make wall times erratic); the
script also reports process CPU time. ``--vision-width/--vision-depth`` rebuild the tower wider
and deeper (random weights) to weigh vision more like a real checkpoint does.

The tiny towers are far cheaper relative to their language model than a real 7B's, so read the
ratio as a lower bound of the saving (docs/environment.md: 22-31% of a real step in the
second encoding).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from opsd_mm.config import ProcessorConfig
from opsd_mm.data.vl_tasks import draw_grid
from opsd_mm.model.tiny import resolve_tiny
from opsd_mm.processors.vision_cache import VisionCache, find_vision_tower
from opsd_mm.processors.vl import QwenVLProcessor
from opsd_mm.types import Example

KINDS = {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl"}


def make_examples(n: int, images: int, side: int) -> list[Example]:
    """``n`` examples with ``images`` distinct side x side grid images each."""
    out = []
    for i in range(n):
        imgs = tuple(
            draw_grid(
                {(r, (r * (i * images + k + 1)) % 8): "red" for r in range(8)}, 8, 8, side // 8
            )
            for k in range(images)
        )
        out.append(
            Example(
                id=f"bench-{i}",
                question=" ".join("<image>" for _ in imgs) + " How many red cells in total?",
                privileged="Each grid has one red cell per row: 8 per grid.",
                images=imgs,
            )
        )
    return out


def wider_tower_model(path, width: int, depth: int) -> torch.nn.Module:
    """The tiny model's config with a wider, deeper vision tower (random weights; the vision
    head size stays 16 and the output size stays the text hidden size)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    vision = config.vision_config
    width_key = "embed_dim" if config.model_type == "qwen2_vl" else "hidden_size"
    setattr(vision, width_key, width)
    vision.num_heads = width // 16
    vision.depth = depth
    if hasattr(vision, "intermediate_size"):
        vision.intermediate_size = 2 * width
    if hasattr(vision, "fullatt_block_indexes"):
        vision.fullatt_block_indexes = [depth - 1]
    if hasattr(vision, "deepstack_visual_indexes"):
        vision.deepstack_visual_indexes = [0]
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32)


def one_step(model, batch, reuse: bool) -> tuple[float, float, int]:
    """Wall and process-CPU seconds for teacher fwd + student fwd/bwd, and the images the
    tower actually encoded (CPU time is steadier than wall time on a shared machine)."""
    C = batch.completion_ids_BC.shape[1]
    mask = batch.completion_mask_BC.bool()

    def logits(side):
        keep = torch.arange(side.prompt_width - 1, side.prompt_width - 1 + C)
        return model(**side.model_inputs, logits_to_keep=keep, use_cache=False).logits

    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    with VisionCache(model, enabled=reuse) as cache:
        with torch.no_grad():
            t_logits = logits(batch.teacher)
        s_logits = logits(batch.student)
    loss = torch.nn.functional.kl_div(
        s_logits[mask].log_softmax(-1),
        t_logits[mask].log_softmax(-1),
        log_target=True,
        reduction="batchmean",
    )
    loss.backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, cache.stats["images_encoded"] if reuse else -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=list(KINDS), default="qwen2.5-vl")
    ap.add_argument("--images", type=int, default=3, help="images per example")
    ap.add_argument("--batch", type=int, default=2, help="examples per step")
    ap.add_argument("--side", type=int, default=448, help="image side in pixels")
    ap.add_argument("--completion", type=int, default=64, help="completion tokens")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument(
        "--vision-width",
        type=int,
        default=0,
        help="rebuild the tower with this width (0: the tiny fixture's), to weigh vision more",
    )
    ap.add_argument("--vision-depth", type=int, default=0, help="tower depth with --vision-width")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_tiny(args.family)
    cfg = ProcessorConfig(max_pixels=args.side * args.side, max_prompt_tokens=1 << 16)
    proc = QwenVLProcessor.from_pretrained(path, cfg, family=KINDS[args.family])
    from transformers import AutoModelForImageTextToText

    if args.vision_width:
        model = wider_tower_model(path, args.vision_width, args.vision_depth or 2)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model.train()
    for p in find_vision_tower(model).parameters():
        p.requires_grad_(False)

    banned = set(proc.suppress_token_ids) | set(proc.eos_token_ids)
    allowed = [i for i in range(len(proc.tokenizer)) if i not in banned]
    g = torch.Generator().manual_seed(0)
    pairs = []
    for ex in make_examples(args.batch, args.images, args.side):
        ids = [allowed[j] for j in torch.randint(len(allowed), (args.completion,), generator=g)]
        pairs.append(proc.pair(ex, ids))
    batch = proc.collate(pairs)
    grid = batch.student.model_inputs["image_grid_thw"]
    n_img = grid.shape[0]
    vis = find_vision_tower(model)
    print(
        f"vision tower: {sum(p.numel() for p in vis.parameters()) / 1e6:.2f} M parameters; "
        f"whole model {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"
    )
    print(
        f"{args.family}: {args.batch} examples x {args.images} images of "
        f"{args.side}x{args.side} ({int(grid[0].prod()) // 4} tokens each); student T="
        f"{batch.student.input_ids_BT.shape[1]}, teacher T={batch.teacher.input_ids_BT.shape[1]}, "
        f"completion C={batch.completion_ids_BC.shape[1]}, torch threads {torch.get_num_threads()}"
    )

    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    encoded = 0
    for i in range(args.steps + 1):  # the first round warms up both variants
        for reuse in (False, True) if i % 2 == 0 else (True, False):
            dt, dc, n = one_step(model, batch, reuse)
            if i > 0:
                wall[reuse].append(dt)
                cpu[reuse].append(dc)
            if reuse:
                encoded = n
    n_teacher = batch.teacher.model_inputs["image_grid_thw"].shape[0]
    print(
        f"images per step: {n_img + n_teacher} requested; encoded {n_img + n_teacher} (plain), "
        f"{encoded} (reuse)"
    )
    for name, times in (("wall", wall), ("cpu", cpu)):
        plain, reused = statistics.median(times[False]), statistics.median(times[True])
        print(
            f"{name:4s} step time (median of {args.steps}): plain {plain * 1e3:8.1f} ms, "
            f"reuse {reused * 1e3:8.1f} ms, speed-up plain/reuse {plain / reused:.2f}x"
        )


if __name__ == "__main__":
    main()
