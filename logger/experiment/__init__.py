"""The paper's experiment harness: small supervised training runs with label noise, logged by ``GradientLogger``.

Chatterjee & Zielinski, *Making Coherence Out of Nothing At All*, §4: the same network trained on real labels and
with 50% and 100% of the labels re-drawn at random, m-coherence tracked on a fixed probe sample. Used by
``gradcoh train``, ``gradcoh demo`` and scripts/reproduce_paper.py; the logger itself does not depend on it.

Modules: :mod:`.datasets` (offline digits, and torchvision datasets found on disk), :mod:`.models` (MLP, CNN,
ResNet-18, EfficientNet-B0 sized to the input), :mod:`.noise` (seeded label corruption), :mod:`.schedule` (the
paper's learning-rate schedule), :mod:`.run` (the loop).
"""

from .run import ExperimentConfig, run_experiment

__all__ = ["ExperimentConfig", "run_experiment"]
