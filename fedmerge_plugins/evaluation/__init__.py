"""The paper's LLM evaluation (GSM8K, MATH, HumanEval, MBPP; plus a local instruction task)
as lm-eval tasks (``eval/*.yaml``), with ``fedmerge eval`` and ``api.evaluate_model``.

Modules: ``tasks`` (names, metrics, data sources), ``prompts``, ``answers`` (answer extraction,
MATH equivalence), ``code_tasks`` and ``code_runner`` (programs from generations, limited
execution), ``loaders`` (hub or local JSONL data, validation split), ``hooks`` (what the YAMLs
call), ``api``, ``report`` (Table 5 layout, alpaca_eval outputs), ``cli``.
Importing this package imports neither torch nor lm-eval.
"""
