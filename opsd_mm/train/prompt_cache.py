"""Rendered prompts kept across epochs (``processor.prompt_cache``).

Why: a processor renders a prompt with one chat-template application, one tokenisation and,
for a VL model, the image processor (resize, normalise, patchify). Every epoch renders every
example again, the same way: the result depends on the example and the processor settings
only. On small models that rendering is a large part of a step (about a quarter of a tiny
Qwen2.5-VL OPSD step on a CPU), and with large images the image processor costs CPU time
on every step. A multi-epoch run can keep the rendered prompts instead.

The cache is keyed by the example object itself (identity, not its id: two rows that share an
id by mistake still get their own prompts) and holds at most ``max_entries`` prompts per side,
least recently used dropped first; a rendering that raises (a bad image) is not kept, so it
raises again the next time. Each hit returns a shallow copy with its own ``meta`` dict, since
the trainer writes per-use keys into it; tensors and ids are shared and never written.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

from opsd_mm.types import Example, Prompt


class PromptCache:
    """Wraps one rendering function (``processor.student_prompt`` or ``teacher_prompt``)."""

    def __init__(self, render: Callable[[Example], Prompt], max_entries: int) -> None:
        self.render = render
        self.max_entries = max_entries
        # id(example) -> (example, prompt); the example is held so its id() is never reused.
        self._entries: OrderedDict[int, tuple[Example, Prompt]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, ex: Example) -> Prompt:
        if self.max_entries <= 0:
            return self.render(ex)
        key = id(ex)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is ex:
            self._entries.move_to_end(key)
            self.hits += 1
            prompt = entry[1]
        else:
            self.misses += 1
            prompt = self.render(ex)
            self._entries[key] = (ex, prompt)
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        out = copy.copy(prompt)
        out.meta = dict(prompt.meta)
        return out
