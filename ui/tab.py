"""The Gradio tab: configure a run, start/stop/resume it, watch the reward curve and samples, export the LoRA.

`build_tab(context)` returns a gr.Blocks that a host mounts (A1111/Forge as a tab, `prdp ui` standalone). The
callbacks are plain functions of a `TabState` so they are tested without a browser; only `build_tab` touches Gradio,
and only with components and events that Gradio 3.41 (A1111), 4.40 (Forge) and the current release all have."""

from __future__ import annotations

import contextlib
import functools
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, NamedTuple

from prdp_core.config import TrainConfig, check_file_name, field_specs, to_widget
from prdp_core.errors import PrdpError
from prdp_core.estimate import run_work
from prdp_core.export import export_lora, run_thumbnail
from prdp_core.plots import line_plot
from prdp_core.prompts import builtin_prompt_sets, evaluation_sets
from prdp_core.rewards import reward_names
from prdp_core.session import (PACE_SETTINGS, WAITING_FOR_GPU, BusyError, RunSession, Snapshot, measured_pace,
                               read_run_config)

from .form import (ADVANCED, BASIC, EVALUATION, FIELDS, QUICK_TRY, REWARD, config_to_form, form_to_config,
                   prompt_source)

EXPORT_FORMATS = ("kohya", "diffusers")
EXPORT_DTYPES = ("fp16", "bf16", "fp32")
UNCHANGED = object()  # poll's "this output is as the caller last saw it"; build_tab sends Gradio's no-op update


@dataclass
class HostContext:
    """What the host tells the tab: where models, LoRAs and runs live, which device, how to hold its GPU lock."""

    models: list[str] = field(default_factory=lambda: ["builtin:toy"])
    lora_dir: Path = Path("loras")
    output_dir: Path = Path("runs")
    device: str = "auto"
    gpu_lock: Callable[[], ContextManager] = contextlib.nullcontext  # A1111: its queue_lock, its model moved away
    defaults: dict = field(default_factory=dict)  # config fields the form starts with instead of TrainConfig's
    after_export: Callable[[Path], None] = lambda path: None  # A1111: refresh its Lora list


class Notice(NamedTuple):
    """A message beside the button that caused it: success, info, warning (nothing done, nothing wrong) or error."""

    kind: str
    text: str


class View(NamedTuple):
    """What one poll sends: the run's status with its progress bar, the log, the pictures and the buttons."""

    status: str  # HTML
    log: str
    curve: object
    gallery: object
    captions: str  # HTML: each prompt of the gallery in full, with its images' rewards
    before_after: object
    controls: object  # (start, stop, resume, export) enabled, or UNCHANGED
    message: object  # the run message: UNCHANGED, or "" once what it said is no longer true
    estimate: object  # UNCHANGED, or the estimate again once a run ended (it may have measured this machine's pace)
    key: tuple


class TabState:
    """The tab's one session (one run per process) and the host context its callbacks read."""

    def __init__(self, context: HostContext, session: RunSession | None = None):
        self.context = context
        self.session = session or RunSession(gpu_lock=context.gpu_lock)
        self.rewards = reward_names()
        # Kept here, not per browser tab: Gradio 3 polls with the inputs of the page's first poll, so a tab's own
        # state would never reach it. There is one session per process, and every tab shows it.
        self._message_under: tuple | None = None  # the session state the latest run message is true in
        self._estimated: tuple = ()  # the form values of the latest estimate
        self._estimated_under: tuple = ()  # the run it could measure its pace by: (run folder, status)
        self._paces: dict[tuple, float | None] = {}  # measured_pace per model and size, until the next run ends

    # ------------------------------------------------------------------------------------------ callbacks
    def config(self, values: list, weights: list, builtin: str, text: str, upload) -> TrainConfig:
        prompts = prompt_source(builtin, text, _file_path(upload), self.context.output_dir)
        return form_to_config(dict(zip(FIELDS, values)), dict(zip(self.rewards, weights)), prompts,
                              host={"output_dir": str(self.context.output_dir), "device": self.context.device})

    def start(self, values: list, weights: list, builtin: str, text: str, upload) -> Notice:
        try:
            self.session.start(self.config(values, weights, builtin, text, upload))
        except BusyError as exc:
            return Notice("warning", f"Not started: {exc}")
        except PrdpError as exc:
            return Notice("error", f"Not started: {exc}")
        return Notice("success", "Started.")

    def stop(self) -> Notice:
        if not self.session.running:
            return Notice("warning", "No run in progress.")
        self.session.stop()
        return Notice("info", "Stopping after the current step; the run folder keeps a checkpoint to resume from.")

    def resume(self, run_dir: str) -> Notice:
        run_dir = (run_dir or "").strip() or str(self.session.snapshot().run_dir or "")
        if not run_dir:
            return Notice("warning", "Nothing to resume: give a run folder.")
        try:
            self.session.resume(run_dir)
        except BusyError as exc:
            return Notice("warning", f"Not resumed: {exc}")
        except PrdpError as exc:
            return Notice("error", f"Not resumed: {exc}")
        return Notice("success", f"Resuming {run_dir}.")

    def run_message(self, notice: Notice) -> Notice:
        """Show `notice` until it is no longer true: until a run starts or ends, or a stop is asked for."""
        state = self.session.snapshot()
        self._message_under = (state.status, state.stopping)
        return notice

    def estimate(self, values: list, weights: list, builtin: str, text: str, upload) -> str:
        """What the form's run will cost, in words: its size, the evaluation's share, and the time on this machine."""
        state = self.session.snapshot()
        self._estimated, self._estimated_under = (values, weights, builtin, text, upload), (state.run_dir, state.status)
        try:
            config = self.config(values, weights, builtin, text, upload)
            sets = evaluation_sets(config)
        except PrdpError as exc:
            return f"Cannot estimate this run yet: {exc}"
        # the form changes at every keystroke; earlier runs' paces only when a run ends (poll clears them then)
        same = tuple(getattr(config, name) for name in PACE_SETTINGS)
        if same not in self._paces:
            self._paces[same] = measured_pace(self.context.output_dir, config)
        return describe_run(config, sets, self._paces[same])

    def poll(self, seen: tuple | None = None) -> View:
        """The view of the run; the pictures and buttons only where they changed since the caller's `seen` key (else
        UNCHANGED), so a tab polling every second does not re-send a gallery of 512 px images each time."""
        state = self.session.snapshot()
        grid = state.run_dir / "previews" / "before_after.png" if state.run_dir else None
        grid_time = grid.stat().st_mtime_ns if grid and grid.is_file() else None
        running = state.status == "running"
        controls = (not running, running and not state.stopping, not running, state.run_dir is not None and not running)
        key = (str(state.run_dir), len(state.curve), len(state.evaluations), state.sampled, grid_time, controls)
        pictures = ((UNCHANGED,) * 4 if key[:5] == (seen or ())[:5] else
                    (_curve(state), state.samples and [(image, caption.split(" | ")[0]) for image, caption in
                                                        state.samples], _captions(state), grid_time and str(grid)))
        stale = self._message_under is not None and self._message_under != (state.status, state.stopping)
        ended = not running and self._estimated and self._estimated_under != (state.run_dir, state.status)
        if ended:
            self._paces.clear()
        return View(_status_html(state), "\n".join(state.log), *pictures,
                    UNCHANGED if seen and tuple(seen[5]) == controls else controls, "" if stale else UNCHANGED,
                    self.estimate(*self._estimated) if ended else UNCHANGED, key)

    def export(self, name: str, fmt: str, dtype: str) -> tuple[Notice, object]:
        """The message, and the file to offer (UNCHANGED after a refusal: the last good link stays)."""
        state = self.session.snapshot()
        if state.run_dir is None or self.session.running:
            return Notice("warning", "Export needs a finished or stopped run."), UNCHANGED
        try:
            check_file_name(name.strip(), "LoRA name")
            destination = self.context.lora_dir / f"{Path(name.strip()).stem}.safetensors"
            if destination.exists():
                return Notice("warning", f"Not exported: {destination.name} already exists in {destination.parent}; "
                                         f"choose another name, or delete that file first."), UNCHANGED
            self.context.lora_dir.mkdir(parents=True, exist_ok=True)
            path = export_lora(state.run_dir, destination, fmt, dtype, sidecar=True,
                               preview=run_thumbnail(state.run_dir))  # A1111's card files
        except PrdpError as exc:
            return Notice("error", f"Not exported: {exc}"), UNCHANGED
        self.context.after_export(path)
        return Notice("success", f"Saved {path}; in a prompt of A1111 or Forge it is `<lora:{path.stem}:1>`."), \
            str(path)

    def save_config(self, values: list, weights: list, builtin: str, text: str, upload) -> tuple[Notice, str | None]:
        try:
            config = self.config(values, weights, builtin, text, upload)
        except PrdpError as exc:
            return Notice("error", f"Not saved: {exc}"), None
        path = self.context.output_dir / "prdp_config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        config.save(path)
        return Notice("success", f"Saved {path}."), str(path)

    def load_config(self, upload) -> tuple[Notice, list | None]:
        """A message, and the form values from a saved .toml/.json config (the fields, then the reward weights,
        then the prompts), or None where it does not load: the form keeps what it has."""
        path, name = _file_path(upload), _file_name(upload)
        try:
            config = TrainConfig.load(path)
        except PrdpError as exc:  # named as the user knows the file, not as Gradio's temporary copy
            reason = str(exc).replace(str(path), name)
            return Notice("error", f"Not loaded: {reason if name in reason else f'{name}: {reason}'}"), None
        values, weights = config_to_form(config, FIELDS, self.rewards)
        return Notice("success", f"Loaded {name}."), [*values, *weights, config.prompts]

    def run_form(self) -> list:
        """The form's values for the run on screen, so that a reloaded page shows the settings of the run it
        reports; UNCHANGED for each output while there is no run."""
        run_dir = self.session.snapshot().run_dir
        config = read_run_config(run_dir) if run_dir else None
        if config is None:
            return [UNCHANGED] * (len(FIELDS) + len(self.rewards) + 1)
        values, weights = config_to_form(config, FIELDS, self.rewards)
        return [*values, *weights, config.prompts]


def discover_models(folder: str | Path = "") -> list[str]:
    """The builtin models, then the checkpoints (.safetensors/.ckpt) and diffusers folders found in `folder` (the
    files inside a diffusers folder are its parts, not models)."""
    from prdp_core.models import BUILTIN_MODELS

    found, pipelines = [], []
    if folder and Path(folder).is_dir():
        for path in sorted(Path(folder).rglob("*")):
            if any(pipeline in path.parents for pipeline in pipelines):
                continue  # a part of a diffusers folder (its unet, vae...), not a model of its own
            if (path / "model_index.json").is_file():
                pipelines.append(path)
                found.append(str(path))
            elif path.suffix.lower() in (".safetensors", ".ckpt"):
                found.append(str(path))
    return [*BUILTIN_MODELS, *found]


def _file_path(upload) -> str | None:
    # Gradio 4+ passes a path; Gradio 3 a temp-file object with .name
    return getattr(upload, "name", upload) or None


def _file_name(upload) -> str:
    # the name the user's file had: Gradio 3 keeps it as .orig_name, Gradio 4+ as the temporary copy's file name
    return Path(getattr(upload, "orig_name", None) or _file_path(upload) or "").name


PHASE_WORDS = {"sampling": "sampling images", "reference": "reference pass"}
NOTICE_STYLE = {"success": ("✓", "#16a34a"), "info": ("…", "#2563eb"), "warning": ("!", "#d97706"),
                "error": ("✗", "#dc2626")}


def notice_html(notice: Notice | None) -> str:
    """A message as a coloured box with its sign (so it reads without colour too); `code` spans stay code."""
    if not notice:
        return ""
    sign, colour = NOTICE_STYLE[notice.kind]
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(notice.text, quote=False))
    return (f'<div class="prdp-notice prdp-{notice.kind}" style="border-left: 4px solid {colour}; '
            f'background: {colour}1f; padding: 6px 10px; border-radius: 4px; margin: 4px 0">'
            f'<b style="color: {colour}">{sign}</b> {text}</div>')


def describe_run(config: TrainConfig, eval_sets: dict[str, list[str]], pace: float | None) -> str:
    """The run's size in words, the evaluation's share of it, and its time at `pace` seconds per image-step."""
    work = run_work(config, eval_sets)
    sets = " and ".join(f"{len(prompts)} {name}" for name, prompts in eval_sets.items())
    share = round(100 * work.evaluations * work.evaluation / work.total) if work.total else 0
    when = "before and after training" if work.evaluations == 2 else f"{work.evaluations} times"
    time = (f"<b>about {_duration(pace * work.total)}</b> on this machine, plus loading the model" if pace else
            "<b>time</b>: shown once the run starts (no earlier run of this model and size here to measure by)")
    return (f"{time} · {config.epochs} epochs of {config.prompts_per_epoch} prompts × {config.images_per_prompt} "
            f"images, {config.num_steps} steps · the evaluation samples {work.eval_images} images ({sets} prompts × "
            f"{config.eval_images_per_prompt}) {when}: {share}% of the work")


def _status_html(state: Snapshot, now: float | None = None) -> str:
    """The run in plain words, counted from 1, then a progress bar with the time taken and the time left."""
    if state.status == "idle":
        return "No run yet."
    elapsed = _duration(state.elapsed(now))
    if state.status == "running":
        if state.phase == WAITING_FOR_GPU:
            words = f"{WAITING_FOR_GPU} (the host is busy)"
        else:
            words = _stage(state) + (" · stopping after the current step" if state.stopping else "")
        left = state.seconds_left(now)
        timing = f"{elapsed} elapsed" + (f" · about {_duration(left)} left" if left is not None else "")
        percent = round(100 * state.fraction())
        return (f"<b>running</b> · {html.escape(words)}{_bar(percent)}"
                f"<div>{percent}% · {timing}</div>")
    text = f"<b>{state.status}</b> · {state.epoch} of {state.epochs} epochs · {elapsed}"
    if state.error:
        return text + notice_html(Notice("error", state.error))
    return text + (_bar(round(100 * state.fraction())) if state.status == "stopped" else "")


def _bar(percent: int) -> str:
    return (f'<div class="prdp-progress" style="height: 8px; border-radius: 4px; margin: 6px 0; overflow: hidden; '
            f'background: rgba(128, 128, 128, 0.25)"><div style="width: {percent}%; height: 100%; '
            f'background: #2563eb"></div></div>')


def _stage(state: Snapshot) -> str:
    if state.phase.startswith("eval"):
        when = ("before training" if state.epoch == 0 and "before" not in state.evaluations else
                "after training" if state.epoch >= state.epochs else f"after epoch {state.epoch}")
        return f"evaluation {when} · {state.phase[len('eval '):]} prompts, batch {state.phase_done} of " \
               f"{state.phase_total}"
    epoch = f"epoch {min(state.epoch + 1, state.epochs)} of {state.epochs}"
    if state.phase == "optimization":
        return f"{epoch} · update {max(state.update, 1)} of {state.updates}"
    if state.phase in PHASE_WORDS:
        return f"{epoch} · {PHASE_WORDS[state.phase]}, batch {state.phase_done} of {state.phase_total}"
    return epoch


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _captions(state: Snapshot) -> str:
    """The gallery's prompts in full, each with the rewards of its images in gallery order."""
    groups: dict[str, list[str]] = {}
    for _, caption in state.samples:
        reward, prompt = caption.split(" | ", 1)
        groups.setdefault(prompt, []).append(reward)
    rows, first = [], 1
    for prompt, rewards in groups.items():
        last = first + len(rewards) - 1
        rows.append(f"<li>images {first}–{last}: <i>{html.escape(prompt)}</i> · rewards {', '.join(rewards)}</li>")
        first = last + 1
    return f'<ul style="margin: 0">{"".join(rows)}</ul>' if rows else ""


def _curve(state: Snapshot):
    """The training samples' reward per epoch (and each component's), and every evaluation's mean with its
    standard error, on the run's whole epoch axis."""
    series, bands = {}, {}
    if state.curve:
        epochs = [row["epoch"] for row in state.curve]
        components = [name for name in state.curve[0] if name not in ("epoch", "reward")]
        names = ["reward", *components] if len(components) > 1 else ["reward"]  # one component is the total
        for name in names:
            series[f"training samples: {name}" if name != "reward" else "training samples"] = \
                (epochs, [row[name] for row in state.curve])
    for name in state.eval_sets:
        points = [(_eval_epoch(label, state.epochs), results[name]) for label, results in state.evaluations.items()
                  if name in results and _eval_epoch(label, state.epochs) is not None]
        if points:
            points.sort(key=lambda point: point[0])
            series[f"evaluation: {name} prompts"] = ([x for x, _ in points], [r["mean"] for _, r in points])
            bands[f"evaluation: {name} prompts"] = [r["se"] for _, r in points]
    if not series:
        return None
    return line_plot(series, "reward: training samples, and evaluations on fixed seeds (± s.e.)", bands=bands,
                     x_range=(0, max(state.epochs, 1)), squares=bands.keys())


def _eval_epoch(label: str, epochs: int) -> int | None:
    if label.startswith("before"):  # a resumed run's "before (recomputed)" too
        return 0
    if label == "after":
        return epochs
    return int(label.split("-")[1]) if label.startswith("epoch-") else None


# ---------------------------------------------------------------------------------------------- the Blocks
def build_tab(context: HostContext | None = None, session: RunSession | None = None):
    """The tab as gr.Blocks; `context` says where models, LoRAs and runs live (default: the current folder).
    A host that builds the tab again (A1111's Reload UI) passes the `session` of the first build, so the new tab
    shows the run in progress."""
    import gradio as gr

    state = TabState(context or HostContext(), session)
    ctx = state.context
    defaults = TrainConfig.from_dict({**TrainConfig().to_dict(), **ctx.defaults})
    widgets = {}

    def widget(spec):
        value, common = getattr(defaults, spec.name), {"info": spec.help, "elem_id": f"prdp_{spec.name}"}
        if spec.name == "model":
            return gr.Dropdown(choices=ctx.models, value=value, label="base model", allow_custom_value=True, **common)
        if spec.kind == "checkbox":
            return gr.Checkbox(value=value, label=spec.label, **common)
        if spec.kind == "dropdown":
            return gr.Dropdown(choices=list(spec.choices), value=value, label=spec.label, **common)
        if spec.kind in ("int", "float"):
            return gr.Number(value=value, label=spec.label, precision=0 if spec.kind == "int" else None, **common)
        return gr.Textbox(value=to_widget(spec.name, value), label=spec.label, **common)

    def rows(specs, per_row):
        for i in range(0, len(specs), per_row):
            with gr.Row():
                for spec in specs[i:i + per_row]:
                    widgets[spec.name] = widget(spec)

    basic = {spec.name: spec for spec in field_specs(BASIC)}
    with gr.Blocks(analytics_enabled=False, title="PRDP LoRA") as blocks:
        gr.Markdown("## PRDP reward finetuning: train a LoRA that raises a reward, then load it in any UI")
        with gr.Row():
            with gr.Column():
                widgets["model"] = widget(basic.pop("model"))
                with gr.Accordion("training prompts", open=True):
                    builtin = gr.Dropdown(choices=[f"builtin:{n}" for n in builtin_prompt_sets()],
                                          value=defaults.prompts, label="built-in prompt set",
                                          allow_custom_value=True)  # a loaded config may name a prompt file
                    prompt_text = gr.Textbox(lines=3, label="or prompts, one per line (used instead of the set)")
                    prompt_file = gr.File(label="or a prompt file (.txt, .json)", file_types=[".txt", ".json"])
                with gr.Accordion("reward mix (weight 0 = not used)", open=True):
                    weights = []
                    for i in range(0, len(state.rewards), 3):  # 3 a row, spaced names: the labels fit
                        with gr.Row():
                            weights += [gr.Number(value=defaults.rewards.get(name, 0.0), label=name.replace("_", " "),
                                                  min_width=150, elem_id=f"prdp_reward_{name}")
                                        for name in state.rewards[i:i + 3]]
                    rows(field_specs(REWARD), 1)
                with gr.Accordion("training", open=True):
                    quick = gr.Button("quick-try settings (a run of minutes)", size="sm", elem_id="prdp_quick_try")
                    rows([spec for name, spec in basic.items() if name != "eval_prompts"], 3)
                with gr.Accordion("evaluation, before and after training on fixed seeds", open=True):
                    widgets["eval_prompts"] = widget(basic.pop("eval_prompts"))
                    rows(field_specs(EVALUATION), 3)
                with gr.Accordion("advanced", open=False):
                    rows(field_specs(ADVANCED), 2)
                with gr.Row():
                    with gr.Column(min_width=160):  # the button above the file it saves, at its own height
                        save = gr.Button("save config")
                        config_file = gr.File(label="saved config", interactive=False)
                    load = gr.File(label="load config (.toml, .json)", file_types=[".toml", ".json"],
                                   elem_id="prdp_load_config")
                config_message = gr.HTML(elem_id="prdp_config_message")  # beside the buttons that caused it
            with gr.Column():
                estimate = gr.HTML(elem_id="prdp_estimate")
                with gr.Row():
                    start = gr.Button("start", variant="primary", elem_id="prdp_start")
                    stop = gr.Button("stop", variant="stop", interactive=False, elem_id="prdp_stop")
                    resume = gr.Button("resume", elem_id="prdp_resume")
                resume_dir = gr.Textbox(label="run folder to resume (empty: the last run)")
                # elem_ids are prefixed: A1111 puts every extension's tab in one page
                message = gr.HTML(elem_id="prdp_message")
                status = gr.HTML("No run yet.", elem_id="prdp_status")
                curve = gr.Image(label="reward curve", show_label=False, type="pil", interactive=False,
                                 elem_id="prdp_curve")  # the plot carries its own title
                gallery = gr.Gallery(label="latest epoch's samples, with their rewards", columns=4, height=360,
                                     elem_id="prdp_gallery")
                captions = gr.HTML(elem_id="prdp_captions")
                log = gr.Textbox(label="log", lines=8, max_lines=20, interactive=False, elem_id="prdp_log")
                with gr.Row():
                    export_name = gr.Textbox(label="LoRA name", value="prdp_lora", elem_id="prdp_export_name")
                    export_format = gr.Dropdown(choices=list(EXPORT_FORMATS), value="kohya", label="format")
                    export_dtype = gr.Dropdown(choices=list(EXPORT_DTYPES), value="fp16", label="dtype")
                export = gr.Button("export", interactive=False, elem_id="prdp_export")
                export_message = gr.HTML(elem_id="prdp_export_message")  # beside the button that caused it
                exported = gr.File(label="exported LoRA", interactive=False, elem_id="prdp_exported")
        # the page's whole width: the grid (8 images of 128 px a row) is readable at its own size
        before_after = gr.Image(label="before / after training, on the evaluation's fixed seeds", interactive=False,
                                elem_id="prdp_before_after")
        seen = gr.State(None)  # per browser tab (Gradio 4+): the key of the pictures and buttons it shows

        fields = [widgets[name] for name in FIELDS]
        form = [*fields, *weights, builtin, prompt_text, prompt_file]
        buttons = [start, stop, resume, export]

        def split(values):
            n, m = len(fields), len(weights)
            return list(values[:n]), list(values[n:n + m]), *values[n + m:]

        def load_config(upload):
            note, values = state.load_config(upload)
            return [notice_html(note), *(values or [gr.update()] * (len(fields) + len(weights) + 1))]  # a failure
            # changes no field

        def update(value):  # UNCHANGED outputs become Gradio's no-op update
            return gr.update() if value is UNCHANGED else value

        def poll(seen_key):
            view = state.poll(seen_key)
            controls = ([gr.update()] * 4 if view.controls is UNCHANGED else
                        [gr.update(interactive=on) for on in view.controls])
            return [update(value) for value in view[:6]] + controls + [update(view.message), update(view.estimate),
                                                                      view.key]

        def run_message(callback):
            @functools.wraps(callback)
            def send(*values):
                return notice_html(state.run_message(callback(*values)))
            return send

        start.click(run_message(lambda *v: state.start(*split(v))), inputs=form, outputs=message)
        stop.click(run_message(state.stop), outputs=message)
        resume.click(run_message(state.resume), inputs=resume_dir, outputs=message)
        export.click(lambda *v: [update(value) if i else notice_html(value) for i, value in
                                 enumerate(state.export(*v))],
                     inputs=[export_name, export_format, export_dtype], outputs=[export_message, exported])
        save.click(lambda *v: (lambda note, path: (notice_html(note), path))(*state.save_config(*split(v))),
                   inputs=form, outputs=[config_message, config_file])
        load.upload(load_config, inputs=load, outputs=[config_message, *fields, *weights, builtin])
        quick.click(lambda: [QUICK_TRY[name] for name in QUICK_TRY], outputs=[widgets[name] for name in QUICK_TRY])
        for component in form:  # the estimate follows the form
            component.change(lambda *v: state.estimate(*split(v)), inputs=form, outputs=estimate,
                             show_progress="hidden")
        blocks.load(lambda *v: state.estimate(*split(v)), inputs=form, outputs=estimate)
        blocks.load(lambda: [update(value) for value in state.run_form()], outputs=[*fields, *weights, builtin])
        outputs = [status, log, curve, gallery, captions, before_after, *buttons, message, estimate, seen]
        # hidden: a progress overlay every second would make the outputs flicker
        if hasattr(gr, "Timer"):  # Gradio >= 4.40
            gr.Timer(1.0).tick(poll, inputs=seen, outputs=outputs, show_progress="hidden")
        else:  # Gradio 3.x polls through `every`
            blocks.load(poll, inputs=seen, outputs=outputs, every=1.0, show_progress="hidden")
    blocks.prdp_state, blocks.prdp_inputs = state, form  # for tests and hosts that want the session
    return blocks
