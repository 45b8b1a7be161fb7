"""opsd-mm: On-Policy Self-Distillation for language and vision-language models.

Importing the package has no side effects; submodules are imported where they are used.
"""

__version__ = "0.1.0"
