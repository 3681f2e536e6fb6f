"""The search engine: grids over λ, ρ and other parameters, the resumable result log and the
selection (``engine``), normalized accuracy, and Ray workers that score grid points."""
