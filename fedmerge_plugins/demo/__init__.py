"""``fedmerge demo``: the paper's LLM experiment (section 7) in miniature, on CPU, offline.

Modules: ``data`` (synthetic tasks, corpus, JSONL), ``tokenizer``, ``train`` (pre-training and
fine-tuning loops), ``build`` (the cached model build), ``recipes`` (templates in
``configs/demo``), ``evaluate`` (lm-eval scoring, item scores), ``run`` (the pipeline),
``stats`` (paired bootstrap), ``compare`` (settings and methods against task arithmetic),
``report`` (tables, report.md, chart), ``cli``. Importing this package imports neither torch nor lm-eval.
"""
