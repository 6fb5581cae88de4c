"""The online loop of PRDP (Algorithm 1) and of the DDPO baseline, with exact, memory-lean gradients.

Per epoch: draw N prompts; sample B trajectories each from the current weights (= theta_old), storing latents and
log pi_old; decode and score with the reward mix; for PRDP, recompute every transition's log-prob under the frozen
reference (LoRA disabled); then K AdamW updates on the objective.

The gradient. The objective L depends on the weights only through the log-probs lp[n, i, t] of the stored
transitions, so  dL/dtheta = sum_{n,i,t} c[n,i,t] * d lp[n,i,t]/dtheta  with  c = dL/dlp  evaluated at the current
log-probs. We (1) get the current lp without gradient (free on the first update: theta = theta_old, so lp equals
the stored log pi_old), (2) get c by autograd through the objective on that small [N, B, T] tensor, then (3) for
each chunk (the same <= batch_size consecutive images as in sampling) and step, recompute lp with gradient and
back-propagate sum(c * lp). Peak memory is one UNet micro-batch whatever B and T are, and chunk-steps whose
coefficients are all zero (clipped steps, all-tied prompts) are skipped.

No UNet work the loss does not need: the reference pass covers only the trained steps, and is skipped while the LoRA
adds exactly nothing (a fresh run's first epoch: lora_B = 0, so log pi_ref = log pi_old to the bit).

Around the loop: evaluation statistics live in evaluation.py, what the run folder shows people (previews, the reward
curve, the before/after grid) in reporting.py, the LoRA's metadata in export.py, memory decisions in memory.py. The
loop's steps are public (setup, sample, train_epoch, update, accumulate_gradient, evaluate), so that tests and
benchmarks can drive them one at a time.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import checkpoints, reporting
from .config import TrainConfig
from .distributed import Processes
from .errors import ConfigError, PrdpError
from .events import (CheckpointWritten, EpochEnd, EpochSampled, Evaluated, Event, Failed, Finished, Progress,
                     RunStarted, StepMetrics)
from .evaluation import EVAL_NOISE_KEY, score_evaluation
from .export import export_lora, training_metadata
from .lora_weights import LoraWeights
from .files import atomic_write_text
from .memory import auto_batch_size, graphs_are_cheap, memory_advice
from .models import (add_lora, apply_memory_options, load_pipeline, lora_disabled, lora_is_zero, lora_modules,
                     lora_parameters, model_info, resolve_device)
from .objectives import EpochBatch, make_objective
from .prompts import describe_evaluation, draw_prompts, evaluation_sets, open_prompts
from .rewards import RewardMix
from .sampling import PhaseMeter, Sampler, Trajectories, chunk_generator, image_chunks, to_pil
from .stat_tracking import PerPromptStatTracker

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RESUMABLE = ("epochs", "batch_size", "device", "keep_checkpoints", "eval_every", "gradient_checkpointing",
             "vae_tiling", "offload_models", "retain_graphs")
EPOCH_PHASES = ("sampling", "decode", "reward", "reference", "optimization")
FP16_GRAD_EXPONENT = 16  # fp16 backward: the largest coefficient is scaled to 2**16, AMP's initial loss scale


class _Cancelled(Exception):
    pass


class Trainer:
    """`Trainer(config, on_event).run(stop_event)` trains, checkpoints every epoch, evaluates before and after,
    and exports the kohya LoRA. `Trainer.resume(run_dir)` continues a stopped run where it stopped."""

    def __init__(self, config: TrainConfig, on_event: Callable[[Event], None] | None = None,
                 resume_dir: str | Path | None = None):
        self.config = config.validate()
        self.on_event = on_event or (lambda event: None)
        self.resume_dir = Path(resume_dir) if resume_dir else None
        # Cheap checks first, so bad prompts or reward names fail before a model is loaded.
        self.train_prompts = open_prompts(config.prompts)  # read from disk as drawn
        self.eval_sets = evaluation_sets(config, self.train_prompts)
        self.processes = Processes.from_environment()  # one, or those started by accelerate launch / torchrun
        self.processes.check_prompts_per_epoch(config.prompts_per_epoch)
        self.device = self.processes.device(resolve_device(config.device))
        self.reward_mix = RewardMix(config.rewards, device=self.device, dtype=config.reward_dtype,
                                    options=config.reward_options, normalization=config.reward_normalization)
        self.reward_mix.check()
        self.objective = make_objective(config)
        # The noisiest steps come first; the objective sees log-probs of the first `trained_steps` of them.
        self.trained_steps = config.trained_steps()
        self.tracker = PerPromptStatTracker() if self.objective.needs_advantages else None
        self.run_dir: Path | None = None
        self.meter: PhaseMeter | None = None
        self.epoch = 0
        self._stop: threading.Event | None = None

    @classmethod
    def resume(cls, run_dir: str | Path, on_event=None, **changes) -> "Trainer":
        """A trainer that continues `run_dir` with its saved config. Only settings that leave the finished epochs
        valid may change (RESUMABLE: e.g. more epochs, a smaller batch_size after running out of memory)."""
        run_dir = Path(run_dir)
        refused = sorted(set(changes) - set(RESUMABLE))
        if refused:
            raise ConfigError(f"a resumed run keeps its saved settings; only {', '.join(RESUMABLE)} can change, not "
                              f"{', '.join(refused)}.")
        if not (run_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"{run_dir} is not a run folder (no {CONFIG_FILE}); pass a folder written by prdp train.")
        config = TrainConfig.load(run_dir / CONFIG_FILE)
        return cls(TrainConfig.from_dict({**config.to_dict(), **changes}), on_event, resume_dir=run_dir)

    # ------------------------------------------------------------------------------------------ the run
    def run(self, stop_event: threading.Event | None = None) -> Path | None:
        """Train to the end (or until `stop_event` is set); returns the exported LoRA's path."""
        self._stop = stop_event
        try:
            try:
                return self._run()
            except _Cancelled:  # what went wrong while ending a stopped run fails it like any other error
                return self._end_stopped()
        except PrdpError as exc:
            if exc.__cause__ is not None:  # wrapping an error of a library or of the user's own code: keep its story
                log = self._log_traceback()
                if log:
                    exc.args = (f"{str(exc).rstrip('.')} (traceback in {log}).",)
            self._emit(Failed(str(exc), self.run_dir))
            raise
        except torch.cuda.OutOfMemoryError:
            phase = self.meter.out_of_memory_in if self.meter is not None else None
            resume = f" the run {self.run_dir}" if self.run_dir else ""
            advice = memory_advice(self.config, phase, getattr(self, "batch_size", None))
            message = (f"out of GPU memory{' in ' + phase if phase else ''}; {advice}, "
                       f"then resume{resume}.")
            self._emit(Failed(message, self.run_dir))
            raise PrdpError(message) from None
        except Exception as exc:
            log = self._log_traceback()
            message = f"unexpected {type(exc).__name__}: {exc}" + (f" (traceback in {log})" if log else "")
            self._emit(Failed(message, self.run_dir))
            raise

    def _end_stopped(self) -> Path | None:
        checkpoint = checkpoints.latest_checkpoint(self.run_dir)
        lora = self._export(checkpoint)
        done = checkpoints.checkpoint_epoch(checkpoint) if checkpoint else 0
        self._emit(Finished(self.run_dir, lora, {"stopped_after_epoch": done}, cancelled=True))
        return lora

    def _run(self) -> Path:
        config = self.config
        started = time.perf_counter()
        self.setup()
        self._emit(RunStarted(self.run_dir, config, self.epoch, len(self.lora_modules), list(self.eval_sets),
                              describe_evaluation(self.eval_sets)))
        if "eval_before" not in self.state:
            self._checkpoint()  # resumable from the very start
            with lora_disabled(self.unet):
                self.state["eval_before"], self.before_images = self.evaluate("before")
            self._checkpoint()
        while self.epoch < config.epochs:
            metrics = self.train_epoch(self.epoch)
            self.epoch += 1
            self._append_metrics(metrics)
            self.state["elapsed_s"] = self.state.get("elapsed_s", 0.0) + time.perf_counter() - started
            started = time.perf_counter()
            self._checkpoint()
            self._emit(EpochEnd(self.epoch, metrics))
            if config.eval_every and self.epoch % config.eval_every == 0 and self.epoch < config.epochs:
                results, _ = self.evaluate(f"epoch-{self.epoch}")
                self._append_metrics({"epoch": self.epoch, "eval": results})  # its own line: a stop during the
                # evaluation leaves the epoch's checkpoint and metrics complete
        after, after_images = self.evaluate("after")
        self._write_before_after(after_images, after)
        self.state["finished_at"] = time.time()
        lora = self._export(checkpoints.latest_checkpoint(self.run_dir))
        summary = self._write_summary(after, lora, time.perf_counter() - started)
        self._emit(Finished(self.run_dir, lora, summary))
        return lora

    def setup(self) -> None:
        config = self.config
        checkpoint = checkpoints.latest_checkpoint(self.resume_dir) if self.resume_dir else None
        if self.resume_dir and checkpoint is None:
            raise ConfigError(f"{self.resume_dir} has no checkpoint to resume from; start a new run instead.")
        self.pipe = load_pipeline(config.model, config.precision, self.device, config.vae,
                                  config.prediction_type)  # before any folder is made
        self.sampler = Sampler(self.pipe, config.num_steps, config.guidance_scale, config.eta,
                               config.negative_prompt, config.resolution)
        if self.processes.is_main:  # the only process that writes the run folder
            self.run_dir = self.resume_dir or _new_run_dir(config)
            config.save(self.run_dir / CONFIG_FILE)
            (self.run_dir / "previews").mkdir(exist_ok=True)
        apply_memory_options(self.pipe, config.gradient_checkpointing, config.vae_tiling, config.offload_models)
        self.meter = PhaseMeter(self.device, self.sampler.clock)
        self.unet = self.pipe.unet
        self.model_info = model_info(self.pipe, config.model, config.resolution)
        torch.manual_seed(config.seed)  # the LoRA's random init (overwritten when resuming)
        add_lora(self.unet, config.lora_rank, config.lora_alpha, config.lora_targets)
        self.lora_modules = lora_modules(self.unet)
        self.params = lora_parameters(self.unet)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, betas=(config.adam_beta1,
                                           config.adam_beta2), eps=config.adam_eps, weight_decay=config.weight_decay)
        images = self.processes.sizes(config.prompts_per_epoch)[self.processes.rank] * config.images_per_prompt
        self.batch_size = config.batch_size or auto_batch_size(images, self.device, self.unet, self._training_peak)
        self.retain_graphs = config.retain_graphs == "on" or (config.retain_graphs == "auto" and graphs_are_cheap(
            config, self.device, self.unet, self.trained_steps, images, self.batch_size))
        self.epoch, self.state, self.before_images = 0, {"started_at": time.time()}, None
        self.preview_image = None  # the exported LoRA's card thumbnail: the latest training sample
        if checkpoint is not None:
            self._restore(checkpoint)
        # the run folder for all, once every process has read the checkpoint that process 0 may now replace
        self.run_dir = Path(self.processes.broadcast(str(self.run_dir)))

    def _training_peak(self, batch: int) -> int:
        """Peak allocated accelerator bytes of one training chunk of `batch` images (forward and backward on random
        latents), from which batch_size auto finds what fits."""
        sampler = self.sampler
        cond, negative = sampler.encode_prompts(self.train_prompts[:1])
        side = sampler.side // self.pipe.vae_scale_factor
        latents = torch.randn(batch, self.unet.config.in_channels, side, side, device=self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        sampler.guided_prediction(latents, sampler.timesteps[0], sampler.chunk_text(cond.expand(batch), negative)) \
            .sum().backward()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated(self.device)

    def _restore(self, checkpoint: Path) -> None:
        from peft.utils import set_peft_model_state_dict

        weights, optimizer_state, state = checkpoints.load_checkpoint(checkpoint)
        set_peft_model_state_dict(self.unet, {k: v.to(self.device) for k, v in weights.state_dict.items()})
        self.optimizer.load_state_dict(optimizer_state)
        self.epoch, self.state = state["epoch"], state
        if self.tracker is not None:
            self.tracker.load_state_dict(state.get("tracker", {}))
        # drop epochs after the checkpoint (and a line cut by a crash): they are redone
        metrics = self.resume_dir / METRICS_FILE
        if self.processes.is_main and metrics.is_file():
            kept = [line for line in metrics.read_text(encoding="utf-8").splitlines() if _epoch_of(line) <= self.epoch]
            atomic_write_text(metrics, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> dict:
        """One epoch of Algorithm 1: sample N x B trajectories from the current weights (theta_old), score them,
        compute their log-probs under the reference model (PRDP), then K updates on these samples. Returns the
        epoch's metrics."""
        config, meter = self.config, self.meter
        meter.reset()
        number = epoch + 1  # events and files count epochs from 1
        self._check_stop(aligned=True)
        prompts = draw_prompts(self.train_prompts, config.prompts_per_epoch, config.seed, epoch)
        share = self.processes.share(len(prompts))  # this process's prompts (all of them without a launcher)
        with meter.phase("sampling"):  # decoding inside it is metered as its own phase
            traj, images = self.sample(prompts, config.images_per_prompt, (config.seed, epoch), number, "sampling",
                                       keep_trajectory=True, share=share)
        with meter.phase("reward"):
            rewards, total, components = self._score(prompts, images, share)
        shown = self._gather_shown(images, share, config.images_per_prompt, reporting.EPOCH_PREVIEW_PROMPTS)
        self._emit_samples(number, prompts, shown, total, components)
        self._check_stop(aligned=True)
        with meter.phase("reference"):
            log_probs_ref = self._reference_log_probs(traj, number)
        with meter.phase("optimization"):
            updates = self._optimize(traj, prompts, rewards, log_probs_ref, epoch)
        return self._epoch_metrics(number, total, components, updates)

    def _score(self, prompts: list[str], images: list, share: slice) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(what the objective learns from, [N, B]; the raw weighted total that is logged; each component) of the
        whole epoch, from this process's `images` of `prompts[share]`."""
        per_prompt = self.config.images_per_prompt
        components = self._gathered_scores(prompts, images, share, per_prompt)
        signal = self.reward_mix.combine(components)  # batch z-scores span the whole epoch
        total = self.reward_mix.combine(components, normalize=False)  # comparable across epochs
        self._offload_rewards()
        return signal.view(len(prompts), per_prompt), total, components

    def _gathered_scores(self, prompts: list[str], images: list, share: slice, per_prompt: int
                         ) -> dict[str, torch.Tensor]:
        """Every component's raw scores of all `prompts` x `per_prompt` images, prompt-major, from this process's
        `images` of `prompts[share]`."""
        mix = self.reward_mix
        if images:
            local = mix.components(images, [p for p in prompts[share] for _ in range(per_prompt)])
        else:  # an evaluation set with fewer prompts than processes leaves some without any
            local = {name: torch.zeros(0) for name in mix.weights}
        return {name: self.processes.gather(scores.view(-1, per_prompt), len(prompts)).flatten()
                for name, scores in local.items()}

    def _gather_shown(self, images: list, share: slice, per_prompt: int, shown_prompts: int) -> list:
        """On process 0, the images of the first `shown_prompts` prompts (what previews show), from this process's
        `images` of `share`; elsewhere an empty list."""
        mine = max(0, min(share.stop, shown_prompts) - share.start) * per_prompt
        parts = self.processes.gather_to_main(images[:mine])
        return [image for part in parts for image in part] if parts is not None else []

    def _reference_log_probs(self, traj: Trajectories, number: int) -> torch.Tensor | None:
        """log pi_ref of the trained steps: the same UNet with the LoRA off (only objectives that need it)."""
        if not self.objective.needs_reference:
            return None
        if lora_is_zero(self.unet):  # the samples' own log-probs are the reference's, bit for bit
            return traj.log_probs[:, :, :self.trained_steps].clone()
        with lora_disabled(self.unet):
            return self.sampler.all_log_probs(traj, self._progress(number, "reference", traj), self.trained_steps)

    def _optimize(self, traj: Trajectories, prompts: list[str], rewards: torch.Tensor,
                  log_probs_ref: torch.Tensor | None, epoch: int) -> list[dict]:
        """K updates on the epoch's samples (`traj`: this process's; `prompts`, `rewards`: the whole epoch's); each
        update's loss, gradient norm and statistics."""
        config, sampler, trained, number = self.config, self.sampler, self.trained_steps, epoch + 1
        everyone = self.processes.gather  # the objective sees every process's transitions
        advantages = None
        if self.tracker is not None:
            advantages = torch.as_tensor(self.tracker.update(prompts, rewards.numpy()), dtype=torch.float32)
            advantages = advantages.to(traj.log_probs.device)
        old = everyone(traj.log_probs[:, :, :trained], len(prompts))
        if log_probs_ref is not None:
            log_probs_ref = everyone(log_probs_ref, len(prompts))
        batch = EpochBatch(old, rewards.to(old.device), log_probs_ref, advantages)
        updates = []
        # one count over the phase's passes (K backward, K - 1 log-prob), so that progress never runs backwards
        progress = self._progress(number, "optimization", traj, repeats=2 * config.updates_per_epoch - 1)
        for k in range(config.updates_per_epoch):
            self._check_stop(aligned=True)
            # theta = theta_old on the first update, where recomputing would reproduce the stored log-probs.
            current, graphs = old, None
            if k > 0:
                if self.retain_graphs:
                    current, graphs = sampler.log_probs_with_graphs(traj, progress, trained)
                else:
                    current = sampler.all_log_probs(traj, progress, trained)
                current = everyone(current, len(prompts))
            loss, grad_norm, stats = self.update(traj, batch, current, graphs, progress)
            updates.append({"loss": loss, "grad_norm": grad_norm, **stats})
            self._emit(StepMetrics(number, k, epoch * config.updates_per_epoch + k + 1, loss, grad_norm, stats))
        return updates

    def _epoch_metrics(self, number: int, total: torch.Tensor, components: dict, updates: list[dict]) -> dict:
        """The epoch's line of metrics.jsonl: rewards, losses, implicit-reward statistics, time (and memory) per
        phase."""
        meter = self.meter
        timings = {phase: meter.seconds.get(phase, 0.0) for phase in EPOCH_PHASES}
        timings["unet_by_phase"] = {phase: meter.unet_seconds.get(phase, 0.0) for phase in EPOCH_PHASES}
        timings["unet"] = sum(timings["unet_by_phase"].values())
        timings["total"] = sum(timings[k] for k in EPOCH_PHASES)
        metrics = {
            "epoch": number,
            "global_step": number * self.config.updates_per_epoch,
            "reward_mean": total.mean().item(),
            "reward_std": total.std().item(),
            "rewards": {name: {"mean": s.mean().item(), "std": s.std().item()} for name, s in components.items()},
            "loss": float(np.mean([u["loss"] for u in updates])),
            "loss_first": updates[0]["loss"],
            "loss_last": updates[-1]["loss"],
            "grad_norm": updates[-1]["grad_norm"],
            "clip_fraction": float(np.mean([u["clip_fraction"] for u in updates])),
            "kl_old_last": updates[-1]["kl_old"],
            "timings": timings,
        }
        if meter.peak_gib:  # accelerators only: peak allocated memory per phase
            metrics["peak_memory_gib"] = {phase: round(gib, 3) for phase, gib in meter.peak_gib.items()}
        for key in ("implicit_reward_mean", "implicit_reward_std", "implicit_reward_abs_max", "valid_pairs"):
            if key in updates[-1]:
                metrics[key] = updates[-1][key]
        return metrics

    def update(self, traj: Trajectories, batch: EpochBatch, current: torch.Tensor,
                graphs: dict | None = None, on_chunk=None) -> tuple[float, float, dict]:
        """One AdamW step on the exact gradient of the objective at the current weights."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = self.accumulate_gradient(traj, batch, current, graphs, on_chunk)
        for param in self.params:  # a skipped chunk may leave a parameter without gradient
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        self.processes.sum_gradients(self.params)  # each process holds its own images' part of the gradient
        max_norm = self.config.max_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm).item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # never step, checkpoint or export NaN weights
            raise PrdpError(f"training diverged in epoch {self.epoch + 1} (loss {loss}, gradient norm {grad_norm}); "
                            f"lower learning_rate or raise beta, then resume from the last checkpoint.")
        self.optimizer.step()
        return loss, grad_norm, stats

    def accumulate_gradient(self, traj: Trajectories, batch: EpochBatch, current: torch.Tensor,
                             graphs: dict | None = None, on_chunk=None) -> tuple[float, dict]:
        """Add dL/dtheta to the LoRA parameters' .grad, one UNet micro-batch at a time (see the module docstring).
        `current` holds the log-probs of every stored transition under the current weights; `graphs`, when given,
        the same log-probs with their autograd graphs (Sampler.log_probs_with_graphs), back-propagated directly.
        `on_chunk` is called after each chunk (progress and stop; a stop is checked in any case)."""
        log_probs = current.detach().clone().requires_grad_(True)
        loss = self.objective.loss(log_probs, batch)
        (coefficients,) = torch.autograd.grad(loss, log_probs)
        stats = self.objective.stats(current, batch)
        # this process's images, [its N * B, steps]: the chunks' flat image order
        coefficients = coefficients[self.processes.share(len(current))].flatten(0, 1)
        chunks = traj.chunks()
        # which chunk-steps have any nonzero coefficient, read in one go rather than waiting at each step
        live = torch.stack([coefficients[images].ne(0).any(dim=0) for images in chunks]).tolist()
        for images, live_steps in zip(chunks, live):
            self._check_stop()
            text = None
            for step, is_live in enumerate(live_steps):
                graph = graphs.pop((images.start, step)) if graphs is not None else None  # freed as we go
                if not is_live:
                    continue
                coef = coefficients[images, step]
                if graph is None:
                    if text is None:
                        text = self.sampler.chunk_text(traj.chunk_cond(images), traj.negative)
                    self.chunk_backward(traj, images, step, coef, text)
                else:
                    with self.sampler.clock.timed():
                        (coef * graph).sum().backward()
            if on_chunk is not None:
                on_chunk()
        return loss.item(), stats

    def chunk_backward(self, traj: Trajectories, images: slice, step: int, coef: torch.Tensor,
                       text=None) -> None:
        """Add d(sum(coef * log pi))/dtheta of one chunk at one step to the LoRA gradients (`text`: the chunk's
        `Sampler.chunk_text`, when already built)."""
        clock = self.sampler.clock
        if self.sampler.unet_dtype != torch.float16:
            chunk_log_probs = self.sampler.chunk_log_probs(traj, images, step, text)
            with clock.timed():
                (coef * chunk_log_probs).sum().backward()
            return
        # fp16 activations: the log-prob gradients (~1e-7 per element) would underflow, so, like AMP's GradScaler,
        # back-propagate a power-of-two multiple and divide it out in fp32; on overflow retry with a smaller one.
        scale = 2.0 ** (FP16_GRAD_EXPONENT - math.ceil(math.log2(coef.abs().max().item())))
        for _ in range(4):
            chunk_log_probs = self.sampler.chunk_log_probs(traj, images, step, text)
            with clock.timed():
                grads = torch.autograd.grad((coef * scale * chunk_log_probs).sum(), self.params,
                                            materialize_grads=True)
            found_inf = torch.zeros(1, device=self.device)
            # GradScaler's fused kernel: divides every gradient by the scale and flags inf/NaN, with one sync
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.tensor(1.0 / scale,
                                                                                             device=self.device))
            if not found_inf.item():
                if self.params[0].grad is None:
                    for param, grad in zip(self.params, grads):
                        param.grad = grad
                else:
                    torch._foreach_add_([p.grad for p in self.params], grads)
                return
            scale /= 2.0**8
        raise PrdpError("gradients overflow in fp16 even when scaled down; set precision to fp32 (or bf16), "
                        "then resume.")

    # ------------------------------------------------------------------------------------------ sampling, eval
    def sample(self, prompts: list[str], count: int, key: tuple, epoch: int, phase: str,
                keep_trajectory: bool = False, share: slice | None = None) -> tuple[Trajectories | None, list]:
        """Sample `count` images for each prompt of `prompts[share]` (default: all) in `image_chunks` of batch_size
        (spanning prompts), each image's noise from (key, prompt index, image). Returns the trajectories (if kept)
        and the decoded PIL images (prompt-major)."""
        sampler, size = self.sampler, self.batch_size
        share = share or slice(0, len(prompts))
        # all prompts in one batch whatever the share, so that each one's conditioning is the same to the bit
        cond, negative = sampler.encode_prompts(prompts)
        first, prompts = share.start, prompts[share]
        cond = cond[share]
        pairs = [(n, i) for n in range(len(prompts)) for i in range(count)]
        chunks = [pairs[images] for images in image_chunks(len(pairs), size)]
        latents, log_probs, images = [], [], []
        for done, chunk in enumerate(chunks, 1):
            self._check_stop()
            # one generator per image: the noise does not depend on how images are batched
            generators = [chunk_generator(*key, first + n, i) for n, i in chunk]
            chunk_cond = cond[torch.tensor([n for n, _ in chunk], device=cond.embeds.device)]
            chunk_latents, chunk_log_probs = sampler.sample_chunk(chunk_cond, negative, len(chunk), generators)
            with self.meter.phase("decode"):
                images += to_pil(sampler.decode(chunk_latents[:, -1]))
            if keep_trajectory:
                latents.append(chunk_latents)
                log_probs.append(chunk_log_probs)
            self._emit(Progress(epoch, phase, done, len(chunks)))
        if not keep_trajectory:
            return None, images
        n_prompts = len(prompts)
        traj = Trajectories(
            prompts=list(prompts), cond=cond, negative=negative, timesteps=sampler.timesteps,
            latents=torch.cat(latents).view(n_prompts, count, *latents[0].shape[1:]),
            log_probs=torch.cat(log_probs).view(n_prompts, count, -1), batch_size=size)
        return traj, images

    def evaluate(self, label: str) -> tuple[dict, dict[str, list]]:
        """Mean reward (with its standard error) of every eval set, on seeds fixed for the whole run, and (on process
        0) the images of the prompts that the before/after grid shows."""
        results, images_by_set = {}, {}
        count = self.config.eval_images_per_prompt
        for index, (name, prompts) in enumerate(self.eval_sets.items()):
            share = self.processes.share(len(prompts))
            images = []
            if share.stop > share.start:
                _, images = self.sample(prompts, count, (self.config.seed, EVAL_NOISE_KEY, index), self.epoch,
                                         f"eval {name}", share=share)
            components = self._gathered_scores(prompts, images, share, count)
            # raw scores: z-scoring each evaluation by itself would make before and after incomparable
            total = self.reward_mix.combine(components, normalize=False)
            results[name] = score_evaluation(total, components)
            images_by_set[name] = self._gather_shown(images, share, count, reporting.BEFORE_AFTER_PROMPTS)
        self._offload_rewards()
        self._emit(Evaluated(self.epoch, label, results))
        return results, images_by_set

    def _offload_rewards(self) -> None:
        if self.config.offload_models:
            self.reward_mix.offload()

    # ------------------------------------------------------------------------------------------ outputs
    def _emit(self, event: Event) -> None:
        if self.processes.is_main:  # the others' events would repeat its own
            self.on_event(event)

    def _progress(self, epoch: int, phase: str, traj: Trajectories, repeats: int = 1):
        """A callback for each chunk of `repeats` passes over the trajectories: checks for a stop, reports progress."""
        total = len(traj.chunks()) * repeats
        counter = iter(range(1, total + 1))

        def on_chunk():
            self._check_stop()
            self._emit(Progress(epoch, phase, next(counter), total))
        return on_chunk

    def _check_stop(self, aligned: bool = False) -> None:
        """Raises _Cancelled when a stop was asked for. Several processes stop together, at a point they all reach
        in step (`aligned`: an epoch's start, its end of sampling and each update's start), so that none waits
        forever for the others."""
        asked = self._stop is not None and self._stop.is_set()
        if self.processes.count > 1:
            if not aligned:
                return
            asked = self.processes.any(asked)
        if asked:
            raise _Cancelled()

    def _emit_samples(self, epoch, prompts, shown_images, total, components) -> None:
        """Process 0 shows the epoch's first images (`shown_images`: those of its first prompts)."""
        if not self.processes.is_main:
            return
        self.preview_image = shown_images[0]
        per_prompt = self.config.images_per_prompt
        shown = len(shown_images)
        self._emit(EpochSampled(epoch, [p for p in prompts for _ in range(per_prompt)][:shown], shown_images,
                                total[:shown].tolist(), total.mean().item(),
                                {name: s.mean().item() for name, s in components.items()}))
        reporting.save_epoch_preview(self.run_dir, epoch, prompts, shown_images, total[:shown].tolist(), per_prompt)

    def _append_metrics(self, metrics: dict) -> None:
        if not self.processes.is_main:
            return
        reporting.append_metrics(self.run_dir / METRICS_FILE, metrics)
        before = self.state.get("eval_before", {}).get("seen")
        reporting.plot_reward_curve(self.run_dir / METRICS_FILE, self.run_dir / "reward_curve.png",
                                    self.reward_mix.describe(), list(self.config.rewards), before and before["mean"])

    def _checkpoint(self) -> None:
        self.state["epoch"] = self.epoch
        if self.tracker is not None:
            self.state["tracker"] = self.tracker.state_dict()
        if not self.processes.is_main:
            return
        path = checkpoints.save_checkpoint(self.run_dir, self.epoch, self._weights(), self.optimizer.state_dict(),
                                           self.state, self.config.keep_checkpoints)
        self._emit(CheckpointWritten(self.epoch, path))

    def _weights(self) -> LoraWeights:
        now = time.time()
        return LoraWeights.from_unet(self.unet, self.model_info, training_metadata(
            self.config, self.epoch, self.state.get("started_at", now), self.state.get("finished_at", now),
            self.reward_mix.describe()))

    def _export(self, checkpoint: Path | None) -> Path | None:
        if checkpoint is None or not self.processes.is_main:
            return None
        name = self.config.lora_name or f"prdp_{self.run_dir.name}"
        # with A1111's card files: <name>.json (reward mix, sd version) and a thumbnail from the latest samples
        return export_lora(checkpoint / "adapter.safetensors", self.run_dir / f"{name}.safetensors", sidecar=True,
                           preview=self.preview_image)

    def _write_before_after(self, after_images: dict[str, list], after: dict) -> None:
        before_images = self.before_images
        if before_images is None:  # resumed run: the base model's eval images are recomputed, same seeds
            with lora_disabled(self.unet):
                _, before_images = self.evaluate("before (recomputed)")
        if not self.processes.is_main:
            return
        reporting.save_before_after(self.run_dir / "previews" / "before_after.png", self.eval_sets,
                                    self.config.eval_images_per_prompt, (before_images, self.state["eval_before"]),
                                    (after_images, after))

    def _write_summary(self, after: dict, lora: Path, seconds: float) -> dict | None:
        if not self.processes.is_main:
            return None
        return reporting.write_summary(self.run_dir / SUMMARY_FILE, self.state["eval_before"], after, lora,
                                       self.state.get("elapsed_s", 0.0) + seconds, self.epoch,
                                       self.reward_mix.describe(), self.config)

    def _log_traceback(self) -> Path | None:
        return reporting.log_traceback(self.run_dir) if self.run_dir is not None and self.processes.is_main else None


def _epoch_of(line: str) -> float:
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _new_run_dir(config: TrainConfig) -> Path:
    root = Path(config.output_dir).expanduser()
    name = config.run_name or time.strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
        run_dir = root / name
        if config.run_name and run_dir.exists():
            raise ConfigError(f"run folder {run_dir} already exists; choose another run name, or resume that "
                              f"run.")
        suffix = 1
        while run_dir.exists():  # two timestamped runs started in the same second
            run_dir, suffix = root / f"{name}-{suffix}", suffix + 1
        run_dir.mkdir()
    except OSError as exc:
        raise ConfigError(f"output folder {root} is not writable ({exc.strerror or exc}); choose another output "
                          f"folder.") from None
    return run_dir
