"""JPEG (in)compressibility, as in DDPO: the size in kB of the image saved as JPEG at quality 95.

No weights, no downloads, and a signal any model can learn: the smoke-test reward."""

from __future__ import annotations

import io

from .base import Reward, register_reward


def jpeg_size_kb(image) -> float:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.tell() / 1000


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    """Larger JPEG files score higher (detail, noise, texture)."""

    name = "jpeg_incompressibility"

    def score_batch(self, images, prompts):
        return [jpeg_size_kb(image) for image in images]


@register_reward("jpeg_compressibility")
class JpegCompressibility(Reward):
    """Smaller JPEG files score higher (flat, smooth images): minus the size in kB."""

    name = "jpeg_compressibility"

    def score_batch(self, images, prompts):
        return [-jpeg_size_kb(image) for image in images]
