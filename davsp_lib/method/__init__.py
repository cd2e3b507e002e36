"""The method: harmfulness vector, diagnostics, Visual Safety Prompt, training, intervention."""
