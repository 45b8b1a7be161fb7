"""Make torchvision importable beside a CPU-only torch (the vLLM test environment only).

Why: the registry's torchvision 0.28 matching torch 2.13.0+cpu is a CUDA build whose C
extension does not load there, and its import then fails registering fake kernels for the
missing ops (``RuntimeError: operator torchvision::nms does not exist``). The Qwen-VL image and
video processors need only torchvision's pure-torch transforms, so this guards those two
registrations to run only when the ops exist. Idempotent; touches nothing outside the given
environment's site-packages. Usage: ``.venv-vllm/bin/python mk/patch_torchvision.py``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

MARK = "# opsd-mm: guarded, torchvision ops may be missing"


def main() -> int:
    spec = importlib.util.find_spec("torchvision")  # finds it without importing it
    if spec is None or spec.origin is None:
        print("torchvision is not installed: nothing to patch (VL tests will be skipped)")
        return 0
    path = Path(spec.origin).with_name("_meta_registrations.py")
    text = path.read_text()
    if MARK in text:
        print(f"{path}: already patched")
        return 0
    patched, count = re.subn(
        r"^@torch\.library\.register_fake\((.*)\)$",
        r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))",
        text,
        flags=re.M,
    )
    if count == 0:
        print(f"{path}: no register_fake line found; torchvision changed, patch not applied")
        return 1
    path.write_text(f"{MARK}\n{patched}")
    print(f"{path}: guarded {count} fake-kernel registrations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
