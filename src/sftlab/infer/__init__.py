"""Inference: generate with the template the run trained with."""
