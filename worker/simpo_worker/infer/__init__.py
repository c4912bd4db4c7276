"""Inference: the jitted prefill/decode programs, sampling, stop strings and the engine's host loop.
May import data, weights, observe, parallel, store, model and contract; never train."""
