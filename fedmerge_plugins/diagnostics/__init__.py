"""``fedmerge inspect``: the heterogeneity of a recipe's task vectors, before any merge.

``stats`` streams the checkpoints once (one tensor name in memory at a time) for norms,
cosines and sign agreement; ``report`` adds what the recipe says (FedNova's weights w_t
and χ²(p‖w), outliers, the paper's ρ grids) and renders text and JSON; ``plot`` draws a
PNG; ``cli`` is the command.
"""
