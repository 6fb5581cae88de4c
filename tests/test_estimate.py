"""How long a run takes: its UNet work counted by hand, the share done at each point of a run, and the time left at
the run's own pace."""

import pytest

from prdp_core.config import TrainConfig
from prdp_core.estimate import run_work
from prdp_core.session import Snapshot, measured_pace

CONFIG = TrainConfig(epochs=3, prompts_per_epoch=2, images_per_prompt=4, num_steps=10, guidance_scale=5.0,
                     train_step_fraction=0.15, updates_per_epoch=4, eval_images_per_prompt=2)


def test_work_counted_by_hand():
    work = run_work(CONFIG, {"seen": ["p"] * 4, "unseen": ["p"] * 3})
    # 8 images x 10 steps x 2 (guidance); 2 trained steps (ceil of 1.5): the reference pass and each update's
    # forward + backward (3 forwards' worth), and the 3 recomputations after the first update
    assert work.passes == {"sampling": 160, "reference": 32, "optimization": 4 * 3 * 32 + 3 * 32}
    assert work.eval_sets == {"seen": 4 * 2 * 10 * 2, "unseen": 3 * 2 * 10 * 2}
    assert (work.eval_images, work.evaluations) == (14, 2)
    assert work.total == 3 * (160 + 32 + 480) - 32 + 2 * 280  # no reference pass in the first epoch
    ddpo = run_work(TrainConfig.from_dict({**CONFIG.to_dict(), "objective": "ddpo", "guidance_scale": 1.0}), {})
    assert ddpo.passes["reference"] == 0 and ddpo.passes["sampling"] == 80  # no reference; no unconditional branch
    every = run_work(TrainConfig.from_dict({**CONFIG.to_dict(), "epochs": 7, "eval_every": 3}), {"seen": ["p"]})
    assert every.evaluations == 4  # before, after epochs 3 and 6, after training


def test_the_share_done_through_a_run():
    work = run_work(TrainConfig.from_dict({**CONFIG.to_dict(), "eval_every": 2}),
                    {"seen": ["p"] * 4, "unseen": ["p"] * 3})
    evaluation, epoch = work.evaluation, work.epoch
    points = [
        (work.done(0, {}, "eval seen", 1, 2), evaluation * 4 / 7 / 2),  # half of the first set of 7 prompts' images
        (work.done(0, {}, "eval unseen", 1, 3), evaluation * (4 + 1) / 7),
        (work.done(0, {"before"}), evaluation),
        (work.done(0, {"before"}, "sampling", 1, 2), evaluation + 80),
        (work.done(0, {"before"}, "optimization", 2, 7), evaluation + 160 + 480 * 2 / 7),  # no first reference
        (work.done(1, {"before"}), evaluation + epoch - 32),
        (work.done(1, {"before"}, "optimization", 0, 7), evaluation + 2 * epoch - 32 - 480),
        (work.done(2, {"before"}, "eval seen", 2, 2), 2 * evaluation * 1 + 2 * epoch - 32 - evaluation + 160),
        (work.done(2, {"before", "epoch-2"}), 2 * evaluation + 2 * epoch - 32),
        (work.done(2, {}, "sampling", 0, 2), 2 * evaluation + 2 * epoch - 32),  # resumed after epoch 2: none repeated
        (work.done(3, {"before", "epoch-2"}, "eval unseen", 3, 3), 2 * evaluation + 3 * epoch - 32 + evaluation),
        (work.done(3, {"before", "after"}, "eval seen", 1, 2), work.total),  # a resumed run redraws "before"
    ]
    for got, expected in points:
        assert got == pytest.approx(expected)
    assert [got for got, _ in points] == sorted(got for got, _ in points)


def test_time_left_goes_by_the_runs_own_pace():
    work = run_work(CONFIG, {"seen": ["p"] * 4})
    # began 100 s ago (model loaded) at 40 % done, now at 60 %: 20 % took 100 s, 40 % are left
    snapshot = Snapshot(status="running", epochs=3, work=work, work_started_at=1000.0,
                        work_at_start=0.4 * work.total)
    snapshot.epoch, snapshot.evaluations = 0, {"before": {}}
    done = work.done(0, {"before"})
    snapshot.work_at_start = done - 0.2 * work.total
    assert snapshot.seconds_left(now=1100.0) == pytest.approx((work.total - done) / (0.2 * work.total) * 100)
    assert snapshot.seconds_left(now=1001.0) is None  # too soon to tell
    assert Snapshot(status="finished", work=work).fraction() == 1.0


def test_an_earlier_runs_pace_is_this_machines_pace(tmp_path):
    assert measured_pace(tmp_path, CONFIG) is None
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "checkpoints" / "epoch-0001" / "state.json").write_text("{}")
    CONFIG.save(run / "config.toml")
    epoch = run_work(CONFIG, {}).epoch
    (run / "metrics.jsonl").write_text('{"epoch": 1, "timings": {"total": 6.0}}\n{"epoch": 1, "eval": {}}\n'
                                       '{"epoch": 2, "timings": {"total": 4.0}}\n')
    # the first epoch's work has no reference pass (32 image-steps)
    assert measured_pace(tmp_path, CONFIG) == pytest.approx((6.0 / (epoch - 32) + 4.0 / epoch) / 2)
    other = TrainConfig.from_dict({**CONFIG.to_dict(), "model": "builtin:tiny"})
    assert measured_pace(tmp_path, other) is None  # another model's pace says nothing about this one
