"""DDPO's per-prompt reward normalisation (kvablack/ddpo-pytorch `stat_tracking.py`), for the DDPO baseline.

Each prompt keeps its last `buffer_size` rewards; a sample's advantage is its reward standardised by its prompt's
history once that holds `min_count` values, and by the whole batch before that. PRDP needs none of this.

Unlike the original, the histories of at most `max_prompts` prompts are kept (those updated last), so that memory and
checkpoints do not grow with a stream of prompts each seen a few times; a prompt dropped starts again from the batch.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class PerPromptStatTracker:
    def __init__(self, buffer_size: int = 16, min_count: int = 16, max_prompts: int = 10_000):
        self.buffer_size, self.min_count, self.max_prompts = buffer_size, min_count, max_prompts
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Advantages for `rewards` [len(prompts), B] (row n belongs to prompts[n])."""
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std() + 1e-6
        for n, prompt in enumerate(prompts):
            # re-inserted, so that the dict's order is the order of last use
            buffer = self.buffers.pop(prompt) if prompt in self.buffers else deque(maxlen=self.buffer_size)
            self.buffers[prompt] = buffer
            buffer.extend(rewards[n].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            advantages[n] = (rewards[n] - mean) / std
        for prompt in list(self.buffers)[:max(0, len(self.buffers) - self.max_prompts)]:
            del self.buffers[prompt]
        return advantages

    def state_dict(self) -> dict:
        return {prompt: list(buffer) for prompt, buffer in self.buffers.items()}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state.items()}
