"""Think blocks in generation prompts: which think tags a rollout may sample, decided from the
rendered generation prompt itself.

Why from the rendered prompt and not from ``processor.*_thinking`` alone: the chat template, not
the flag, decides what the prompt already holds, and real templates disagree.

- Thinking-only templates (Qwen3-*-Thinking-2507, Qwen3-VL-*-Thinking) end every generation
  prompt with an open ``<think>\\n``, whatever ``enable_thinking`` says. The completion must be
  allowed to close it (``</think>``), or the model can never reach its answer; a second
  ``<think>`` is wrong.
- The hybrid Qwen3 template with thinking off ends with an empty closed block
  ``<think>\\n\\n</think>\\n\\n``: no think tag may follow.
- Templates without think tags (Qwen3-Instruct-2507, Qwen2-VL, Qwen2.5-VL, Qwen3-VL-Instruct, the
  hybrid template with thinking on) leave it to the flag: thinking on allows a whole
  ``<think>...</think>`` block in the completion, thinking off forbids both tags.

``think_state`` reads the prompt text; ``think_tags_to_suppress`` turns a state and the role's
thinking flag into the tags a rollout must never sample (and ``pair`` rejects).
"""

from __future__ import annotations

from typing import Literal

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

ThinkState = Literal["open", "closed", "none"]


def think_state(prompt_text: str) -> ThinkState:
    """Where the rendered generation prompt ``prompt_text`` leaves the think block.

    ``open``: it ends (trailing whitespace aside) with an unclosed ``<think>``. ``closed``: it
    ends with ``</think>`` (the empty block a template adds when thinking is off). ``none``: it
    ends with neither - the completion starts outside any think block.

    Only the end counts: think tags inside the question or an earlier turn are content, and a
    generation prompt always ends with the assistant header plus whatever the template prefills.
    """
    tail = prompt_text.rstrip()
    if tail.endswith(THINK_OPEN):
        return "open"
    if tail.endswith(THINK_CLOSE):
        return "closed"
    return "none"


def think_tags_to_suppress(state: ThinkState, thinking: bool) -> tuple[str, ...]:
    """The think tags a completion after a prompt in ``state`` must never contain.

    ``open``: ``<think>`` (the block is open; ``</think>`` must stay possible). ``closed``: both
    (the block is over). ``none``: none when ``thinking`` is on (the model opens and closes its
    own block), both when it is off.
    """
    if state == "open":
        return (THINK_OPEN,)
    if state == "closed" or not thinking:
        return (THINK_OPEN, THINK_CLOSE)
    return ()
