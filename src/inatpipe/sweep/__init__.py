"""Sweeps over DVC experiments: the search space, and the report that ranks finished experiments."""
