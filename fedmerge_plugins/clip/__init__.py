"""CLIP adapter: the paper's section 6 experiment on Hugging Face CLIP checkpoints.

Vision towers fine-tuned per task (``CLIPVisionModel``) are merged with task arithmetic
and the four fedmerge methods, and scored with zero-shot heads built from the base CLIP
text encoder. Modules: ``tasks`` (class names and templates), ``models`` (loading and
exporting towers), ``heads``, ``data``, ``evaluate``, ``experiment``, ``summary``, ``cli``.
"""
