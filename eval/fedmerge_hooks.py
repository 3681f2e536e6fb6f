"""``!function`` targets of the task YAMLs in this directory (lm-eval imports them from a file
beside the YAML); the code lives in ``fedmerge_plugins.evaluation.hooks``."""

from fedmerge_plugins.evaluation.hooks import *  # noqa: F401,F403
