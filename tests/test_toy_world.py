"""The toy world generator: deterministic, its captions describe its pictures, and the unseen split is held out."""

import numpy as np
import pytest

from prdp_core.toy.world import COLOURS, SIZES, all_scenes, dataset, parse_caption, render, scenes


def _shape_mask(image, scene):
    pixels = np.asarray(image).astype(float)
    to_fg = ((pixels - np.array(COLOURS[scene.colour])) ** 2).sum(-1)
    to_bg = ((pixels - np.array(COLOURS[scene.background])) ** 2).sum(-1)
    return to_fg < to_bg


def _measured_scene(image, scene):
    """Read shape, size and position back from the pixels with simple geometry (independent of the drawing code)."""
    mask = _shape_mask(image, scene)
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    height, width = bottom - top + 1, right - left + 1
    fill = mask.sum() / (height * width)
    centroid_drop = (ys.mean() - (top + bottom) / 2) / height  # a triangle's mass sits low in its box
    if fill > 0.826:
        shape = "square"
    elif fill > 0.6:
        shape = "circle"
    else:
        shape = "triangle" if centroid_drop > 0.1 else "star"
    side = image.size[0]
    cx, cy = xs.mean() / side, ys.mean() / side
    position = ("left" if cx < 0.4 else "right" if cx > 0.6 else "top" if cy < 0.4 else "bottom" if cy > 0.6
                else "center")
    size = "large" if max(height, width) / side > (SIZES["small"] + SIZES["large"]) / 2 else "small"
    return shape, size, position


def test_world_size_and_split():
    everything = all_scenes()
    assert len(everything) == 2240 and len(set(everything)) == 2240
    train, unseen = scenes("train"), scenes("unseen")
    assert len(train) + len(unseen) == 2240 and 0.15 < len(unseen) / 2240 < 0.3
    triples = lambda group: {(s.shape, s.colour, s.background) for s in group}  # noqa: E731
    assert not triples(train) & triples(unseen)  # no unseen triple appears in training, at any size or position
    assert {s.shape for s in unseen} == {s.shape for s in train}  # every attribute itself is seen in training
    assert {s.colour for s in unseen} == {s.colour for s in train}


def test_rendering_is_deterministic_per_seed():
    scene = all_scenes()[123]
    assert np.array_equal(np.asarray(render(scene, seed=5)), np.asarray(render(scene, seed=5)))
    assert not np.array_equal(np.asarray(render(scene, seed=5)), np.asarray(render(scene, seed=6)))
    first = dataset("train", 6, seed=3)
    again = dataset("train", 6, seed=3)
    assert [c for _, c, _ in first] == [c for _, c, _ in again]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _, _), (b, _, _) in zip(first, again))


@pytest.mark.parametrize("split", ["train", "unseen"])
def test_captions_match_pictures(split):
    for image, caption, scene in dataset(split, 300, seed=11):
        assert parse_caption(caption) == scene and scene.colour in caption and scene.shape in caption
        pixels = np.asarray(image)
        assert tuple(pixels[1, 1]) == COLOURS[scene.background] or tuple(pixels[-2, -2]) == COLOURS[scene.background]
        mask = _shape_mask(image, scene)
        ys, xs = np.nonzero(mask)
        inner = pixels[int(np.median(ys)), int(np.median(xs))]
        assert np.abs(inner.astype(int) - COLOURS[scene.colour]).max() <= 12  # the shape is in the caption's colour
        assert _measured_scene(image, scene) == (scene.shape, scene.size, scene.position), caption


def test_parse_caption_rejects_other_text():
    assert parse_caption("a painting of a cat") is None
    assert parse_caption("  A small red circle in the center, blue background ").colour == "red"


def test_shipped_prompt_sets_are_the_generator_output():
    from prdp_core.prompts import load_prompts

    assert load_prompts("builtin:toy_train") == [s.caption for s in scenes("train")]
    assert load_prompts("builtin:toy_unseen") == [s.caption for s in scenes("unseen")]


def test_shipped_classifier_reads_held_out_scenes():
    """Unseen (shape, colour, background) triples, fresh seeds, blur/noise damage: shape and colour above 95 %
    (measured when trained: 99.5 % and 99.9 %)."""
    from prdp_core.toy.classifier import accuracy, load_classifier

    model = load_classifier()
    clean = accuracy(model, "unseen", 400, seed=77)
    damaged = accuracy(model, "unseen", 400, seed=78, damaged=True)
    for result in (clean, damaged):
        assert result["shape"] > 0.95 and result["colour"] > 0.95 and result["background"] > 0.95


def test_toy_alignment_prefers_the_true_caption():
    from prdp_core.errors import RewardError
    from prdp_core.rewards import create_reward

    reward = create_reward("toy_alignment")
    data = dataset("unseen", 40, seed=5)
    images = [d[0] for d in data]
    true = reward.score(images, [d[1] for d in data])
    wrong_shape = [d[1].replace(d[2].shape, next(s for s in ("circle", "square") if s != d[2].shape)) for d in data]
    false = reward.score(images, wrong_shape)
    assert (true > false).float().mean() > 0.95 and true.mean() > -0.5
    with pytest.raises(RewardError, match="toy-world captions"):
        reward.score(images[:1], ["a painting of a cat"])


def test_toy_match_is_the_probability_of_shape_and_colour():
    from prdp_core.rewards import create_reward

    data = dataset("unseen", 40, seed=6)
    images = [d[0] for d in data]
    match = create_reward("toy_match")
    true = match.score(images, [d[1] for d in data])
    # the same caption with another colour for the shape, or another shape: either half wrong is a mismatch
    wrong_colour = [d[1].replace(f" {d[2].colour} ", f" {next(c for c in COLOURS if c not in d[1])} ", 1)
                    for d in data]
    wrong_shape = [d[1].replace(d[2].shape, next(s for s in ("circle", "square") if s != d[2].shape)) for d in data]
    assert ((true >= 0) & (true <= 1)).all() and true.mean() > 0.9  # rendered scenes read as captioned
    for wrong in (wrong_colour, wrong_shape):
        assert wrong != [d[1] for d in data] and match.score(images, wrong).mean() < 0.1
