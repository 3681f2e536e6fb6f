"""What the autoload puts into mergekit's own merge path: recipe checks, model sources,
weight-file and shape checks, and the staged output (``hooks`` wraps mergekit's planner and
``run_merge`` with them)."""
