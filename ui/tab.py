"""The Gradio tab: configure a run, start/stop/resume it, watch the reward curve and samples, export the LoRA.

`build_tab(context)` returns a gr.Blocks that a host mounts (A1111/Forge as a tab, `prdp ui` standalone). The
callbacks are plain functions of a `TabState` so they are tested without a browser; only `build_tab` touches Gradio,
and only with components and events that Gradio 3.41 (A1111), 4.40 (Forge) and the current release all have."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

from prdp_core.config import TrainConfig, check_file_name
from prdp_core.errors import PrdpError
from prdp_core.export import export_lora
from prdp_core.plots import line_plot
from prdp_core.prompts import builtin_prompt_sets
from prdp_core.rewards import reward_names
from prdp_core.session import RunSession, Snapshot

from .form import ADVANCED, BASIC, config_to_form, field_specs, form_to_config, prompt_source, to_widget

FIELDS = BASIC + ADVANCED
EXPORT_FORMATS = ("kohya", "diffusers")
EXPORT_DTYPES = ("fp16", "bf16", "fp32")


@dataclass
class HostContext:
    """What the host tells the tab: where models, LoRAs and runs live, which device, how to hold its GPU lock."""

    models: list[str] = field(default_factory=lambda: ["builtin:toy"])
    lora_dir: Path = Path("loras")
    output_dir: Path = Path("runs")
    device: str = "auto"
    gpu_lock: Callable[[], ContextManager] = contextlib.nullcontext  # A1111: its queue_lock


class TabState:
    """The tab's one session (one run per process) and the host context its callbacks read."""

    def __init__(self, context: HostContext):
        self.context = context
        self.session = RunSession(gpu_lock=context.gpu_lock)
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

    def poll(self) -> tuple[str, Any, list, Any, str]:
        """Status line, reward-curve image, latest samples, before/after grid, log."""
        state = self.session.snapshot()
        before_after = state.run_dir / "previews" / "before_after.png" if state.run_dir else None
        return (_status_line(state), _curve(state), state.samples,
                str(before_after) if before_after and before_after.is_file() else None, "\n".join(state.log))

    def export(self, name: str, fmt: str, dtype: str) -> tuple[str, str | None]:
        state = self.session.snapshot()
        if state.run_dir is None or self.session.running:
            return "Export needs a finished or stopped run.", None
        try:
            check_file_name(name, "LoRA name")
            self.context.lora_dir.mkdir(parents=True, exist_ok=True)
            path = export_lora(state.run_dir, self.context.lora_dir / f"{Path(name).stem}.safetensors", fmt, dtype)
        except PrdpError as exc:
            return f"Not exported: {exc}", None
        return f"Saved {path}.", str(path)

    def save_config(self, values: list, weights: list, builtin: str, text: str, upload) -> tuple[str, str | None]:
        try:
            config = self.config(values, weights, builtin, text, upload)
        except PrdpError as exc:
            return f"Not saved: {exc}", None
        path = self.context.output_dir / "prdp_config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        config.save(path)
        return f"Saved {path}.", str(path)

    def load_config(self, upload) -> list:
        """Form values from a saved .toml/.json config: the fields, then the reward weights, then the prompts."""
        config = TrainConfig.load(_file_path(upload))
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


def _status_line(state: Snapshot) -> str:
    if state.status == "idle":
        return "No run yet."
    text = f"**{state.status}** - epoch {state.epoch}/{state.epochs}"
    if state.phase:
        text += f" - {state.phase} {state.phase_done}/{state.phase_total}"
    if state.error:
        text += f"\n\n{state.error}"
    return text


def _curve(state: Snapshot):
    if not state.curve:
        return None
    epochs = [row["epoch"] for row in state.curve]
    series = {name: (epochs, [row[name] for row in state.curve]) for name in state.curve[0] if name != "epoch"}
    return line_plot(series, "reward per epoch (training samples)")


# ---------------------------------------------------------------------------------------------- the Blocks
def build_tab(context: HostContext | None = None):
    """The tab as gr.Blocks; `context` says where models, LoRAs and runs live (default: the current folder)."""
    import gradio as gr

    state = TabState(context or HostContext())
    ctx = state.context
    defaults = TrainConfig()
    widgets = {}

    def widget(spec):
        value = getattr(defaults, spec.name)
        if spec.name == "model":
            return gr.Dropdown(choices=ctx.models, value=value, label="base model", info=spec.help,
                               allow_custom_value=True)
        if spec.kind == "checkbox":
            return gr.Checkbox(value=value, label=spec.label, info=spec.help)
        if spec.kind == "dropdown":
            return gr.Dropdown(choices=list(spec.choices), value=value, label=spec.label, info=spec.help)
        if spec.kind in ("int", "float"):
            return gr.Number(value=value, label=spec.label, info=spec.help, precision=0 if spec.kind == "int" else None)
        return gr.Textbox(value=to_widget(spec.name, value), label=spec.label, info=spec.help)

    with gr.Blocks(analytics_enabled=False, title="PRDP LoRA") as blocks:
        gr.Markdown("## PRDP reward finetuning: train a LoRA that raises a reward, then load it in any UI")
        with gr.Row():
            with gr.Column():
                builtin = gr.Dropdown(choices=[f"builtin:{n}" for n in builtin_prompt_sets()],
                                      value=defaults.prompts, label="built-in prompt set",
                                      allow_custom_value=True)  # a loaded config may name a prompt file
                prompt_text = gr.Textbox(lines=4, label="or prompts, one per line (used instead of the set)")
                prompt_file = gr.File(label="or a prompt file (.txt, .json)", file_types=[".txt", ".json"])
                with gr.Accordion("reward mix (weight 0 = not used)", open=True):
                    weights = [gr.Number(value=defaults.rewards.get(name, 0.0), label=name)
                               for name in state.rewards]
                for spec in field_specs(BASIC):
                    widgets[spec.name] = widget(spec)
                with gr.Accordion("advanced", open=False):
                    for spec in field_specs(ADVANCED):
                        widgets[spec.name] = widget(spec)
                with gr.Row():
                    save = gr.Button("save config")
                    load = gr.File(label="load config (.toml, .json)", file_types=[".toml", ".json"])
                config_file = gr.File(label="saved config", interactive=False)
            with gr.Column():
                with gr.Row():
                    start = gr.Button("start", variant="primary")
                    stop = gr.Button("stop")
                    resume_dir = gr.Textbox(label="run folder to resume (empty: the last run)")
                    resume = gr.Button("resume")
                message = gr.Markdown()
                status = gr.Markdown("No run yet.")
                curve = gr.Image(label="reward curve", type="pil", interactive=False)
                gallery = gr.Gallery(label="latest epoch: reward | prompt")
                before_after = gr.Image(label="before / after on fixed seeds", interactive=False)
                log = gr.Textbox(label="log", lines=8, max_lines=20, interactive=False)
                with gr.Row():
                    export_name = gr.Textbox(label="LoRA name", value="prdp_lora")
                    export_format = gr.Dropdown(choices=list(EXPORT_FORMATS), value="kohya", label="format")
                    export_dtype = gr.Dropdown(choices=list(EXPORT_DTYPES), value="fp16", label="dtype")
                    export = gr.Button("export")
                exported = gr.File(label="exported LoRA", interactive=False)

        fields = [widgets[name] for name in FIELDS]
        form = [*fields, *weights, builtin, prompt_text, prompt_file]

        def split(values):
            n, m = len(fields), len(weights)
            return list(values[:n]), list(values[n:n + m]), *values[n + m:]

        start.click(lambda *v: state.start(*split(v)), inputs=form, outputs=message)
        stop.click(state.stop, outputs=message)
        resume.click(state.resume, inputs=resume_dir, outputs=message)
        export.click(state.export, inputs=[export_name, export_format, export_dtype], outputs=[message, exported])
        save.click(lambda *v: state.save_config(*split(v)), inputs=form, outputs=[message, config_file])
        load.upload(state.load_config, inputs=load, outputs=[*fields, *weights, builtin])
        outputs = [status, curve, gallery, before_after, log]
        if hasattr(gr, "Timer"):  # Gradio >= 4.40
            gr.Timer(1.0).tick(state.poll, outputs=outputs)
        else:  # Gradio 3.x polls through `every`
            blocks.load(state.poll, outputs=outputs, every=1.0)
    blocks.prdp_state = state  # for tests and hosts that want the session
    return blocks
