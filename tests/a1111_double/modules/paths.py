"""Double of modules/paths.py: the webui's data and models folders (set by the test)."""

data_path = "."
models_path = "models"
