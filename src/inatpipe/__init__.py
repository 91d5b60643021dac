"""inatpipe: a reproducible DVC pipeline that trains, evaluates and compares image classifiers."""

__version__ = "0.1.0"
