"""Double of modules/devices.py: the webui's torch device and its cache cleanup."""

import torch

cpu = torch.device("cpu")
device = torch.device("cpu")
gc_calls = []


def torch_gc():
    gc_calls.append(True)
