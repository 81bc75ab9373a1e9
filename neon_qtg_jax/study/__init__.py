"""Studies: grids of training runs (variants x seeds under one budget), their statistics and report."""
