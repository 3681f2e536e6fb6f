"""``fedmerge sweep``: search λ and ρ for a recipe, scoring each grid point.

The search itself (grid, FedGMA's equivalent ρ merged once, the resumable JSONL log, the
tie rule, the winner recipe) is ``fedmerge_plugins.search.engine``. Here: ``grid`` parses the
grid options and checks each point's recipe; ``memory`` decides whether the inputs fit in
memory; ``merger`` holds the input checkpoints in memory (read once) and merges each point
with mergekit's own ``run_merge``, so a point's merge is the one ``mergekit-yaml`` writes
for its recipe; ``evaluators`` scores a merged model; ``results`` fingerprints the log and
prints its table; ``run`` ties them together; ``errors`` is ``SweepError``; ``cli`` is the
command, which turns fedmerge errors into one line.
"""
