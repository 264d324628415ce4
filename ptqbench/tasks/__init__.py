"""Offline lm-eval tasks built from the embedded text sources (installed as ``ptqbench.tasks``).

``nextpassage``: a grouped multiple-choice task, one group per embedded domain (``code``, ``docs``, ``prose``):
given a passage from a domain's held-out evaluation split, pick its true continuation among four, the three others
being continuations of passages from elsewhere in the same domain. ``build(spec)`` writes the JSONL files and the
lm-eval task YAMLs into a cache folder and returns it, to be loaded with ``lm_eval.tasks.TaskManager(include_path=...)``.
"""

from ptqbench.tasks.nextpassage import NextPassageSpec, build, build_items, calib_shingles

__all__ = ["NextPassageSpec", "build", "build_items", "calib_shingles"]
