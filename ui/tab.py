"""The Gradio tab: configure a run, start/stop/resume it, watch the reward curve and samples, export the LoRA.

`build_tab(context)` returns a gr.Blocks that a host mounts (A1111/Forge as a tab, `prdp ui` standalone). The
callbacks are plain functions of a `TabState` so they are tested without a browser; only `build_tab` touches Gradio,
and only with components and events that Gradio 3.41 (A1111), 4.40 (Forge) and the current release all have."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

from prdp_core.config import TrainConfig, check_file_name, field_specs, to_widget
from prdp_core.errors import PrdpError
from prdp_core.export import export_lora, run_thumbnail
from prdp_core.plots import line_plot
from prdp_core.prompts import builtin_prompt_sets
from prdp_core.rewards import reward_names
from prdp_core.session import WAITING_FOR_GPU, RunSession, Snapshot, read_run_config

from .form import ADVANCED, BASIC, FIELDS, REWARD, config_to_form, form_to_config, prompt_source

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


class TabState:
    """The tab's one session (one run per process) and the host context its callbacks read."""

    def __init__(self, context: HostContext, session: RunSession | None = None):
        self.context = context
        self.session = session or RunSession(gpu_lock=context.gpu_lock)
        self.rewards = reward_names()

    # ------------------------------------------------------------------------------------------ callbacks
    def config(self, values: list, weights: list, builtin: str, text: str, upload) -> TrainConfig:
        prompts = prompt_source(builtin, text, _file_path(upload), self.context.output_dir)
        return form_to_config(dict(zip(FIELDS, values)), dict(zip(self.rewards, weights)), prompts,
                              host={"output_dir": str(self.context.output_dir), "device": self.context.device})

    def start(self, values: list, weights: list, builtin: str, text: str, upload) -> str:
        try:
            self.session.start(self.config(values, weights, builtin, text, upload))
        except PrdpError as exc:
            return f"Not started: {exc}"
        return "Started."

    def stop(self) -> str:
        if not self.session.running:
            return "No run in progress."
        self.session.stop()
        return "Stopping after the current step; the run folder keeps a checkpoint to resume from."

    def resume(self, run_dir: str) -> str:
        run_dir = (run_dir or "").strip() or str(self.session.snapshot().run_dir or "")
        if not run_dir:
            return "Nothing to resume: give a run folder."
        try:
            self.session.resume(run_dir)
        except PrdpError as exc:
            return f"Not resumed: {exc}"
        return f"Resuming {run_dir}."

    def poll(self, seen: tuple | None = None) -> tuple:
        """Status line, log, reward-curve image, latest samples, before/after grid, and the key of what was sent.

        The three pictures are rebuilt only when they changed since the caller's `seen` key (else UNCHANGED), so a
        tab polling every second does not re-send a gallery of 512 px images each time."""
        state = self.session.snapshot()
        grid = state.run_dir / "previews" / "before_after.png" if state.run_dir else None
        grid_time = grid.stat().st_mtime_ns if grid and grid.is_file() else None
        key = (str(state.run_dir), len(state.curve), state.sampled, grid_time)
        pictures = (UNCHANGED,) * 3 if key == seen else (_curve(state), state.samples, grid_time and str(grid))
        return (_status_line(state), "\n".join(state.log), *pictures, key)

    def export(self, name: str, fmt: str, dtype: str) -> tuple[str, object]:
        """The message, and the file to offer (UNCHANGED after a refusal: the last good link stays)."""
        state = self.session.snapshot()
        if state.run_dir is None or self.session.running:
            return "Export needs a finished or stopped run.", UNCHANGED
        try:
            check_file_name(name.strip(), "LoRA name")
            destination = self.context.lora_dir / f"{Path(name.strip()).stem}.safetensors"
            if destination.exists():
                return (f"Not exported: {destination.name} already exists in {destination.parent}; choose another "
                        f"name, or delete that file first."), UNCHANGED
            self.context.lora_dir.mkdir(parents=True, exist_ok=True)
            path = export_lora(state.run_dir, destination, fmt, dtype, sidecar=True,
                               preview=run_thumbnail(state.run_dir))  # A1111's card files
        except PrdpError as exc:
            return f"Not exported: {exc}", UNCHANGED
        self.context.after_export(path)
        return f"Saved {path}; in a prompt of A1111 or Forge it is `<lora:{path.stem}:1>`.", str(path)

    def save_config(self, values: list, weights: list, builtin: str, text: str, upload) -> tuple[str, str | None]:
        try:
            config = self.config(values, weights, builtin, text, upload)
        except PrdpError as exc:
            return f"Not saved: {exc}", None
        path = self.context.output_dir / "prdp_config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        config.save(path)
        return f"Saved {path}.", str(path)

    def load_config(self, upload) -> tuple[str, list | None]:
        """A message, and the form values from a saved .toml/.json config (the fields, then the reward weights,
        then the prompts), or None where it does not load: the form keeps what it has."""
        path, name = _file_path(upload), _file_name(upload)
        try:
            config = TrainConfig.load(path)
        except PrdpError as exc:  # named as the user knows the file, not as Gradio's temporary copy
            reason = str(exc).replace(str(path), name)
            return f"Not loaded: {reason if name in reason else f'{name}: {reason}'}", None
        values, weights = config_to_form(config, FIELDS, self.rewards)
        return f"Loaded {name}.", [*values, *weights, config.prompts]


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
    """The builtin models, then the checkpoints (.safetensors/.ckpt) and diffusers folders found in `folder`."""
    from prdp_core.models import BUILTIN_MODELS

    found = []
    if folder and Path(folder).is_dir():
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix.lower() in (".safetensors", ".ckpt") or (path / "model_index.json").is_file():
                found.append(str(path))
    return [*BUILTIN_MODELS, *found]


def _file_path(upload) -> str | None:
    # Gradio 4+ passes a path; Gradio 3 a temp-file object with .name
    return getattr(upload, "name", upload) or None


def _file_name(upload) -> str:
    # the name the user's file had: Gradio 3 keeps it as .orig_name, Gradio 4+ as the temporary copy's file name
    return Path(getattr(upload, "orig_name", None) or _file_path(upload) or "").name


PHASE_WORDS = {"sampling": "sampling images", "reference": "reference pass", "optimization": "updating the LoRA"}


def _status_line(state: Snapshot, now: float | None = None) -> str:
    """The run in plain words: what it does now, counted from 1, with the time it has taken."""
    if state.status == "idle":
        return "No run yet."
    elapsed = _duration(state.elapsed(now))
    if state.status == "running":
        if state.phase == WAITING_FOR_GPU:
            return f"**running** · {WAITING_FOR_GPU} (the host is busy) · {elapsed}"
        parts = [f"**running** · {_stage(state)}"]
        if state.phase and state.phase_total:
            parts.append(f"batch {state.phase_done} of {state.phase_total}")
        return " · ".join([*parts, f"{round(100 * state.fraction())}%", f"{elapsed} elapsed"])
    text = f"**{state.status}** · {state.epoch} of {state.epochs} epochs · {elapsed}"
    return f"{text}\n\n{state.error}" if state.error else text


def _stage(state: Snapshot) -> str:
    if state.phase.startswith("eval"):
        when = ("before training" if state.epoch == 0 and "before" not in state.evaluations else
                "after training" if state.epoch >= state.epochs else f"after epoch {state.epoch}")
        return f"evaluation {when}, {state.phase[len('eval '):]} prompts"
    words = PHASE_WORDS.get(state.phase, state.phase)
    return f"epoch {min(state.epoch + 1, state.epochs)} of {state.epochs}" + (f", {words}" if words else "")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _curve(state: Snapshot):
    if not state.curve:
        return None
    epochs = [row["epoch"] for row in state.curve]
    components = [name for name in state.curve[0] if name not in ("epoch", "reward")]
    names = ["reward", *components] if len(components) > 1 else ["reward"]  # one component is the total itself
    series = {name: (epochs, [row[name] for row in state.curve]) for name in names}
    return line_plot(series, "reward per epoch (training samples)")


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
                    widgets["eval_prompts"] = widget(basic.pop("eval_prompts"))
                with gr.Accordion("reward mix (weight 0 = not used)", open=True):
                    weights = []
                    for i in range(0, len(state.rewards), 3):  # 3 a row, spaced names: the labels fit
                        with gr.Row():
                            weights += [gr.Number(value=defaults.rewards.get(name, 0.0), label=name.replace("_", " "),
                                                  min_width=150, elem_id=f"prdp_reward_{name}")
                                        for name in state.rewards[i:i + 3]]
                    rows(field_specs(REWARD), 1)
                with gr.Accordion("training", open=True):
                    rows(list(basic.values()), 3)
                with gr.Accordion("advanced", open=False):
                    rows(field_specs(ADVANCED), 2)
                with gr.Row():
                    save = gr.Button("save config")
                    load = gr.File(label="load config (.toml, .json)", file_types=[".toml", ".json"],
                                   elem_id="prdp_load_config")
                    config_file = gr.File(label="saved config", interactive=False)
                config_message = gr.Markdown(elem_id="prdp_config_message")  # beside the buttons that caused it
            with gr.Column():
                with gr.Row():
                    start = gr.Button("start", variant="primary")
                    stop = gr.Button("stop", variant="stop")
                    resume = gr.Button("resume")
                resume_dir = gr.Textbox(label="run folder to resume (empty: the last run)")
                # elem_ids are prefixed: A1111 puts every extension's tab in one page
                message = gr.Markdown(elem_id="prdp_message")
                status = gr.Markdown("No run yet.", elem_id="prdp_status")
                curve = gr.Image(label="reward curve", show_label=False, type="pil", interactive=False,
                                 elem_id="prdp_curve")  # the plot carries its own title
                gallery = gr.Gallery(label="latest epoch: reward | prompt", columns=4, height=360,
                                     elem_id="prdp_gallery")
                before_after = gr.Image(label="before / after on fixed seeds", interactive=False, height=512,
                                        elem_id="prdp_before_after")
                log = gr.Textbox(label="log", lines=8, max_lines=20, interactive=False, elem_id="prdp_log")
                with gr.Row():
                    export_name = gr.Textbox(label="LoRA name", value="prdp_lora", elem_id="prdp_export_name")
                    export_format = gr.Dropdown(choices=list(EXPORT_FORMATS), value="kohya", label="format")
                    export_dtype = gr.Dropdown(choices=list(EXPORT_DTYPES), value="fp16", label="dtype")
                export = gr.Button("export")
                export_message = gr.Markdown(elem_id="prdp_export_message")  # beside the button that caused it
                exported = gr.File(label="exported LoRA", interactive=False, elem_id="prdp_exported")
        seen = gr.State(None)  # per browser tab: the key of the pictures it shows

        fields = [widgets[name] for name in FIELDS]
        form = [*fields, *weights, builtin, prompt_text, prompt_file]

        def split(values):
            n, m = len(fields), len(weights)
            return list(values[:n]), list(values[n:n + m]), *values[n + m:]

        def load_config(upload):
            note, values = state.load_config(upload)
            return [note, *(values or [gr.update()] * (len(fields) + len(weights) + 1))]  # a failure changes no field

        def as_updates(callback):
            @functools.wraps(callback)
            def send(*values):  # UNCHANGED outputs become Gradio's no-op update
                return [gr.update() if value is UNCHANGED else value for value in callback(*values)]
            return send

        poll = as_updates(state.poll)

        start.click(lambda *v: state.start(*split(v)), inputs=form, outputs=message)
        stop.click(state.stop, outputs=message)
        resume.click(state.resume, inputs=resume_dir, outputs=message)
        export.click(as_updates(state.export), inputs=[export_name, export_format, export_dtype],
                     outputs=[export_message, exported])
        save.click(lambda *v: state.save_config(*split(v)), inputs=form, outputs=[config_message, config_file])
        load.upload(load_config, inputs=load, outputs=[config_message, *fields, *weights, builtin])
        blocks.load(as_updates(state.run_form), outputs=[*fields, *weights, builtin])
        outputs = [status, log, curve, gallery, before_after, seen]
        # hidden: a progress overlay every second would make the outputs flicker
        if hasattr(gr, "Timer"):  # Gradio >= 4.40
            gr.Timer(1.0).tick(poll, inputs=seen, outputs=outputs, show_progress="hidden")
        else:  # Gradio 3.x polls through `every`
            blocks.load(poll, inputs=seen, outputs=outputs, every=1.0, show_progress="hidden")
    blocks.prdp_state = state  # for tests and hosts that want the session
    return blocks
