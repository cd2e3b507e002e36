"""Models: the adapter contract and its architectures, the embedded default, input building."""
