"""``fedmerge demo``: the paper's LLM experiment (section 7) in miniature, on CPU, offline.

Modules: ``data`` (synthetic tasks, corpus, JSONL), ``tokenizer``, ``train`` (pre-training and
fine-tuning loops), ``pool`` (one-thread worker processes), ``build`` (the cached model build,
trained in those workers), ``recipes`` (templates in ``configs/demo``), ``evaluate`` (lm-eval
scoring, item scores), ``variants`` (what a run measures, as data), ``run`` (the pipeline),
``stats`` (paired bootstrap), ``compare`` (settings and methods against task arithmetic),
``environment`` (CPU, threads, versions), ``report`` (tables, report.md, chart), ``cli``.
Importing this package imports neither torch nor lm-eval.
"""
