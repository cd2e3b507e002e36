"""The runtime: files, errors, sharding, the main job, the CLI, notebooks, figures, recipe card."""
