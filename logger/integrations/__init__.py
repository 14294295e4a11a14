"""Turning the logger on inside training frameworks: Hugging Face ``Trainer`` and Lightning callbacks.

Each integration imports its framework only when used (``gradcoh.logger`` imports without them); install the extras
``gradcoh[hf]`` or ``gradcoh[lightning]``.
"""
