"""Perplexity, MMLU, HumanEval and MT-Bench."""
