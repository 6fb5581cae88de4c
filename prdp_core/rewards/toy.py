"""Does the image show the prompt's shape and colour? The toy world's stand-ins for PickScore/HPS.

Both read the small attribute classifier shipped with the package (prdp_core/toy/classifier.py) for the scene the
toy caption describes:
- `toy_alignment` = log p(shape | image) + log p(colour | image): 0 is a certain match, large negative values a
  clear mismatch (unbounded below, so a few clear misses dominate a batch's spread);
- `toy_match` = p(shape | image) * p(colour | image), in [0, 1]: its mean over images is about the fraction drawn
  as prompted, and every miss counts the same (the default run's reward)."""

from __future__ import annotations

import torch

from ..errors import RewardError
from .base import Reward, register_reward


@register_reward("toy_alignment")
class ToyAlignment(Reward):
    name = "toy_alignment"
    batch_size = 64

    def load(self) -> None:
        from ..toy.classifier import load_classifier

        self.model = load_classifier().to(self.device)

    @torch.no_grad()
    def score_batch(self, images, prompts):
        from ..toy.classifier import HEADS, to_tensor
        from ..toy.world import parse_caption

        scenes = [parse_caption(p) for p in prompts]
        for prompt, scene in zip(prompts, scenes):
            if scene is None:
                raise RewardError(f"toy_alignment scores toy-world captions such as 'a small red circle in the center, "
                                  f"blue background', not {prompt!r}; train on builtin:toy_train prompts.")
        logits = self.model(to_tensor(images).to(self.device))
        score = torch.zeros(len(images), device=self.device)
        for attribute in ("shape", "colour"):
            index = torch.tensor([HEADS[attribute].index(getattr(s, attribute)) for s in scenes], device=self.device)
            score += torch.log_softmax(logits[attribute].float(), dim=1).gather(1, index[:, None]).squeeze(1)
        return score.cpu()


@register_reward("toy_match")
class ToyMatch(ToyAlignment):
    name = "toy_match"

    def score_batch(self, images, prompts):
        return super().score_batch(images, prompts).exp()
