"""Data: typed records, benchmark loaders and downloads, rendering, splits, pools, prompts."""
