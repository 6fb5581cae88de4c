"""Test double of comfy.model_management: the device, model unloading, cache release and the Interrupt flag.

`calls` records what a node asked of the model manager, in order, so tests can check the hand-over of memory."""

import threading

import torch

calls: list[str] = []
_interrupt = False
_interrupt_lock = threading.RLock()


class InterruptProcessingException(Exception):
    pass


def get_torch_device():
    return torch.device("cpu")  # what ComfyUI returns under --cpu


def unload_all_models():
    calls.append("unload_all_models")


def soft_empty_cache(force=False):
    calls.append("soft_empty_cache")


def interrupt_current_processing(value=True):
    """What the Interrupt button (POST /interrupt) does."""
    global _interrupt
    with _interrupt_lock:
        _interrupt = value


def processing_interrupted():
    with _interrupt_lock:
        return _interrupt


def throw_exception_if_processing_interrupted():
    global _interrupt
    with _interrupt_lock:
        if _interrupt:
            _interrupt = False
            raise InterruptProcessingException()
