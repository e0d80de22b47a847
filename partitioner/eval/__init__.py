"""The quality harness: perplexity, token agreement, codec and compression costs."""
