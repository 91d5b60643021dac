"""Evaluation: test-set metrics, report figures, the model comparison, predictions and looking inside a model."""
