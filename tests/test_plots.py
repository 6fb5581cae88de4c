"""Reward curves readable at a glance: round tick values, whole-number epochs."""

import pytest

from prdp_core.plots import _ticks, line_plot


@pytest.mark.parametrize("low, high, integers, ticks", [
    (1, 6, True, [1, 2, 3, 4, 5, 6]),  # every epoch of a short run
    (1, 16, True, [5, 10, 15]),
    (1, 2, True, [1, 2]),
    (-3.2, 7.9, False, [-2, 0, 2, 4, 6]),
    (18.2, 24.7, False, [20, 22, 24]),
])
def test_ticks_are_round_and_inside_the_range(low, high, integers, ticks):
    assert _ticks(low, high, integers) == pytest.approx(ticks)


def _centre(image, colour) -> tuple[float, float]:
    """Where the pixels of `colour` are, on average (one marker: its centre)."""
    found = [(x, y) for x in range(image.width) for y in range(image.height) if image.getpixel((x, y)) == colour]
    assert found, f"nothing drawn in {colour}"
    return sum(x for x, _ in found) / len(found), sum(y for _, y in found) / len(found)


BLUE, RED = (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)  # the first two series' colours


def test_one_epoch_sits_on_the_runs_axis_with_the_evaluations_apart():
    # one finished epoch of two, between the evaluations before (epoch 0) and after (epoch 2)
    lone = line_plot({"training": ([1], [0.5])}, "one epoch of two", x_range=(0, 2))
    both = line_plot({"training": ([1], [0.5]), "evaluation": ([0, 2], [0.3, 0.3])}, "one epoch of two",
                     bands={"evaluation": [0.3, 0.3]}, x_range=(0, 2), squares={"evaluation"})
    frame = [x for x in range(lone.width) if lone.getpixel((x, lone.height - 41)) == (0, 0, 0)]  # the x axis
    middle = (frame[0] + frame[-1]) / 2
    legend_free = both.crop((0, both.height // 6, both.width, both.height))  # below the legend
    training, evaluation = _centre(legend_free, BLUE), _centre(legend_free, RED)
    assert abs(_centre(lone.crop((0, lone.height // 6, lone.width, lone.height)), BLUE)[0] - middle) < 2
    assert abs(training[0] - middle) < 2  # mid-axis, not the whole plot's width at its edge
    assert abs(evaluation[0] - middle) < 2 and evaluation[1] > training[1]  # the flat evaluation line, lower


def test_points_at_the_ends_are_drawn_whole():
    image = line_plot({"training": ([0, 1], [0.2, 0.6])}, "two epochs", x_range=(0, 1))
    plot = image.crop((0, image.height // 6, image.width, image.height))
    xs = [x for x in range(plot.width) for y in range(plot.height) if plot.getpixel((x, y)) == BLUE]
    left_axis = next(x for x in range(plot.width) if plot.getpixel((x, plot.height // 2)) == (0, 0, 0))
    assert min(xs) > left_axis  # the marker at epoch 0 is not cut by the frame
