"""Accuracy tools: sliding-window perplexity and HumanEval pass@1, on a local model or an endpoint."""
