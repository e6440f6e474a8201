"""One module per dvc.yaml stage, each with a `main` that the CLI calls."""
