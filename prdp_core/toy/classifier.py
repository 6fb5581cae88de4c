"""A small attribute classifier for the toy world: shape, colour, background, size and position of an image.

It is the toy stand-in for PickScore/HPS: the `toy_alignment` reward asks it how likely an image shows what its
prompt says. Trained on rendered scenes with blur, noise and colour jitter so that it also reads the softer
pictures a diffusion model draws. Rebuild the shipped weights with

    python -m prdp_core.toy.classifier --out prdp_core/toy/weights/classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .world import COLOURS, POSITIONS, SHAPES, SIZES, Scene, dataset

HEADS = {"shape": list(SHAPES), "colour": list(COLOURS), "background": list(COLOURS), "size": list(SIZES),
         "position": list(POSITIONS)}
WEIGHTS = Path(__file__).parent / "weights" / "classifier.safetensors"


class AttributeClassifier(nn.Module):
    """64x64 RGB in [0, 1] -> one logit vector per attribute."""

    def __init__(self, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 2 * width),
                                      block(2 * width, 4 * width))  # 64 -> 4
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width * 4, len(labels)) for name, labels in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.pool(self.features(images * 2 - 1)).flatten(1)
        return {name: head(features) for name, head in self.heads.items()}


def to_tensor(images) -> torch.Tensor:
    """PIL images -> [n, 3, 64, 64] float in [0, 1] (resized if needed)."""
    from PIL import Image

    arrays = [np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def reads_as_prompted(model: "AttributeClassifier", images, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per image, whether the classifier reads the colour, the shape, and both, that its toy caption names."""
    from .world import parse_caption

    logits = model(to_tensor(images))
    scenes = [parse_caption(p) for p in prompts]
    hits = {k: logits[k].argmax(1) == torch.tensor([HEADS[k].index(getattr(s, k)) for s in scenes])
            for k in ("colour", "shape")}
    return {**hits, "both": hits["colour"] & hits["shape"]}


def labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(getattr(s, name)) for s in scenes]) for name, values in HEADS.items()}


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour jitter: the kinds of damage a small diffusion model's pictures show."""
    n = images.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=generator)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = nn.functional.conv2d(nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    images = images + blur * (blurred - images)
    images = images * (1 + 0.15 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5))
    images = images + 0.06 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)


def train_classifier(samples: int = 24000, epochs: int = 4, seed: int = 0, log=print) -> AttributeClassifier:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = dataset("train", samples, seed=seed)
    images = to_tensor([d[0] for d in data])
    targets = labels([d[2] for d in data])
    model = AttributeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (samples // 128)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(samples, generator=generator)
        total = 0.0
        for start in range(0, samples - 127, 128):
            index = order[start:start + 128]
            logits = model(augment(images[index], generator))
            loss = sum(nn.functional.cross_entropy(logits[k], targets[k][index]) for k in HEADS)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        log(f"epoch {epoch + 1}/{epochs}: loss {total / (samples // 128):.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: AttributeClassifier, split: str, count: int, seed: int, damaged: bool = False) -> dict[str, float]:
    data = dataset(split, count, seed=seed)
    images = to_tensor([d[0] for d in data])
    if damaged:
        images = augment(images, torch.Generator().manual_seed(seed))
    targets = labels([d[2] for d in data])
    logits = model.eval()(images)
    return {k: (logits[k].argmax(1) == targets[k]).float().mean().item() for k in HEADS}


def load_classifier(path: str | Path = WEIGHTS) -> AttributeClassifier:
    from safetensors.torch import load_file

    model = AttributeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy-world attribute classifier.")
    parser.add_argument("--out", default=str(WEIGHTS), help="Output .safetensors file.")
    parser.add_argument("--samples", type=int, default=24000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    start = time.perf_counter()
    model = train_classifier(args.samples, args.epochs, args.seed)
    seconds = time.perf_counter() - start
    report = {split: accuracy(model, split, 2000, seed=1000 + i) for i, split in enumerate(("train", "unseen"))}
    report["unseen_damaged"] = accuracy(model, "unseen", 2000, seed=1002, damaged=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out,
              metadata={"prdp_toy_classifier": json.dumps({"heads": HEADS, "train_seconds": round(seconds, 1),
                                                           "accuracy": report})})
    print(json.dumps({"train_seconds": round(seconds, 1), "accuracy": report}, indent=2))


if __name__ == "__main__":
    main()
