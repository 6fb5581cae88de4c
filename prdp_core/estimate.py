"""How much work a run is, so that a face can say how long it will take before it starts and how long is left while
it runs.

Work is counted in UNet image-steps: one image's latent through the UNet at one sampling step, two with classifier-free
guidance; a backward pass counts as two. Seconds come from this machine: before a run, the pace a finished epoch of an
earlier run with the same model and size measured (session.measured_pace); during a run, its own pace since it
began."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .config import TrainConfig

BACKWARD = 2.0  # a backward pass costs about two forward passes
EPOCH_PASSES = ("sampling", "reference", "optimization")


@dataclass(frozen=True)
class RunWork:
    """A run's UNet work in image-steps, phase by phase."""

    epochs: int
    eval_every: int
    eval_sets: dict[str, float]  # one evaluation's work per set, in the order it samples them
    eval_images: int  # images one evaluation samples
    passes: dict[str, float]  # one epoch's work per pass (EPOCH_PASSES)

    @property
    def epoch(self) -> float:
        return sum(self.passes.values())

    def epoch_work(self, number: int) -> float:
        """Epoch `number`'s work (from 1): the first has no reference pass (a fresh LoRA is the reference model)."""
        return self.epoch - (self.passes["reference"] if number == 1 else 0.0)

    @property
    def evaluation(self) -> float:
        return sum(self.eval_sets.values())

    @property
    def evaluations(self) -> int:
        """Before and after training, and after every eval_every-th epoch but the last."""
        return 2 + ((self.epochs - 1) // self.eval_every if self.eval_every else 0)

    @property
    def total(self) -> float:
        return self.epochs * self.epoch - self.passes["reference"] + self.evaluations * self.evaluation

    def done(self, epoch: int, evaluated: set[str] | Mapping, phase: str = "", phase_done: int = 0,
             phase_total: int = 0) -> float:
        """Work done with `epoch` epochs complete, the evaluations `evaluated` ("before", "epoch-N", "after")
        complete, and `phase_done` of `phase_total` chunks of `phase` ("sampling", ..., "eval <set>") in progress."""
        within = phase_done / phase_total if phase_total else 0.0
        training = phase in EPOCH_PASSES
        evaluating = phase.startswith("eval ")
        # a resumed run does not repeat the evaluations before its checkpoint, and its snapshot does not list them
        before_done = "before" in evaluated or epoch > 0 or training
        work = self.evaluation if before_done else 0.0
        work += sum(self.epoch_work(number) for number in range(1, min(epoch, self.epochs) + 1))
        if self.eval_every:
            between = [e for e in range(self.eval_every, self.epochs, self.eval_every) if e <= epoch]
            pending = epoch in between and not training and f"epoch-{epoch}" not in evaluated
            work += (len(between) - pending) * self.evaluation
        if "after" in evaluated:
            return self.total  # a resumed run then redraws its "before" images: nothing left that counts
        if training:
            passes = {**self.passes, "reference": 0.0} if epoch == 0 else self.passes  # in the first epoch
            names = list(passes)
            index = names.index(phase)
            work += sum(passes[n] for n in names[:index]) + within * passes[phase]
        elif evaluating:
            name, names = phase[len("eval "):], list(self.eval_sets)
            if name in names:
                index = names.index(name)
                work += sum(self.eval_sets[n] for n in names[:index]) + within * self.eval_sets[name]
        return min(work, self.total)


def run_work(config: TrainConfig, eval_sets: Mapping[str, Sequence[str]]) -> RunWork:
    """The work of a run with `config` whose evaluations sample `eval_sets` (set name -> prompts)."""
    guidance = 2 if config.guidance_scale > 1.0 else 1  # the sampler skips the unconditional branch at scale <= 1
    images = config.prompts_per_epoch * config.images_per_prompt
    trained = images * config.trained_steps() * guidance
    updates = config.updates_per_epoch
    from .objectives import make_objective  # the objective says whether it needs the reference pass

    reference = trained if make_objective(config).needs_reference else 0.0
    eval_images = sum(map(len, eval_sets.values())) * config.eval_images_per_prompt
    return RunWork(
        epochs=config.epochs, eval_every=config.eval_every,
        eval_sets={name: len(prompts) * config.eval_images_per_prompt * config.num_steps * guidance
                   for name, prompts in eval_sets.items()},
        eval_images=eval_images,
        # K forward + backward passes, and K - 1 passes that recompute the log-probs after an update
        passes={"sampling": images * config.num_steps * guidance, "reference": reference,
                "optimization": updates * (1 + BACKWARD) * trained + (updates - 1) * trained})
