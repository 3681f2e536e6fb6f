"""``fedmerge sweep``: search λ, ρ and any other numeric parameter of a recipe, scoring each grid point.

The search itself (grid, FedGMA's equivalent ρ merged once, the resumable JSONL log, the
tie rule, the winner recipe) is ``fedmerge_plugins.search.engine``. Here: ``plan`` checks the
request (``grid`` parses the grid options and checks each point's recipe) and chooses memory
or disk (``memory``); ``merger`` holds the input checkpoints in memory (read once) for
mergekit's loaders; ``point`` is one point's unit of work: merged into a model the evaluator
loaded once, from the D of its group (``factored``: θ₀ + λ·D bit for bit as mergekit writes
it), or merged by mergekit's own ``run_merge`` into a folder (``scratch``); ``evaluators``
scores a model; ``results`` fingerprints the log and prints its table; ``picture`` draws
``sweep.png``; ``run`` ties them together; ``errors`` is ``SweepError``; ``cli`` is the
command, which turns fedmerge errors into one line.
"""
