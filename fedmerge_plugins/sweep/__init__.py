"""``fedmerge sweep``: search λ and ρ for a recipe, scoring each grid point.

``grid`` parses the grid options and writes each point's recipe; ``memory`` decides
whether the inputs fit in memory; ``merger`` holds the input checkpoints in memory (read
once) and merges each point with mergekit's own ``run_merge``, so a point's merge is the
one ``mergekit-yaml`` writes for its recipe; ``evaluators`` scores a merged model;
``results`` keeps the resumable JSONL and picks the winner; ``run`` ties them together;
``cli`` is the command.
"""
