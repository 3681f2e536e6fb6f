"""fedmerge's own exceptions.

Library modules raise a subclass of ``FedmergeError`` whose message is one line naming the
model, tensor, file or key at fault. Only CLI modules (and the hook that runs inside
mergekit's own ``mergekit-yaml`` command) turn them into click errors, through
``fedmerge_plugins.cli.one_line_errors`` (the hooks in ``mergekit_hooks`` only under a click context).
"""

from __future__ import annotations


class FedmergeError(Exception):
    """Base class of every error fedmerge raises on purpose (bad input, a failed check)."""
