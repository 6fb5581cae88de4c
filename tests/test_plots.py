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


def test_flat_and_single_point_curves_draw():
    image = line_plot({"reward": ([1], [0.5])}, "one epoch")
    # the lone point sits at the left end (8 px inside the frame at 64 px), half-way between the plot's top (below
    # the title and a row of legend: 24 + 14 + 6 px) and bottom (360 - 40 px)
    assert image.getpixel((72, (44 + 320) // 2)) == (0x1F, 0x77, 0xB4)


def test_one_epoch_on_the_runs_axis_with_evaluations_apart():
    image = line_plot({"training": ([1], [0.5]), "evaluation": ([0, 2], [0.3, 0.4])}, "one of two epochs",
                      x_range=(0, 2), squares={"evaluation"})
    red, blue = (0xD6, 0x27, 0x28), (0x1F, 0x77, 0xB4)
    assert image.getpixel((72 + (640 - 64 - 16 - 16) // 2, 44)) == blue  # epoch 1 of 2, the highest: mid-top
    assert image.getpixel((72 - 4, 320 - 4)) == red  # the evaluation at epoch 0, the lowest: a square's corner
    assert image.getpixel((344 - 3, 44 + 3)) != blue  # a dot has no corners
