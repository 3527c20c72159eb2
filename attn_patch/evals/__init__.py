"""Evaluations (perplexity, needle in a haystack, passkey) and the end-to-end benchmark.

Each module is usable from Python and backs one ``attn-patch eval|bench`` subcommand.
"""
