"""Double of Forge's backend/memory_management.py: the calls that free the GPU."""

calls = []


def unload_all_models():
    calls.append("unload_all_models")


def soft_empty_cache(force=False):
    calls.append("soft_empty_cache")
