"""`prdp`: the command-line face of the engine (train, export, sample, score, reward-server).

Training flags are generated from TrainConfig, so the CLI, the Gradio tab and the ComfyUI nodes share one set of
names, defaults and help texts.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import threading
import traceback
from pathlib import Path

from .config import LOW_VRAM, TrainConfig, config_fields, field_specs, field_type
from .errors import ConfigError, PrdpError, library_reason

TRAIN_EPILOG = """examples:
  prdp train                                   # the embedded default: a tiny model on CPU, JPEG reward
  prdp train --model ./sd15 --prompts prompts.txt --reward jpeg_compressibility --epochs 50 --out runs
  prdp train --config my_run.toml --seed 3     # a config file, with flags overriding it
  prdp train --resume runs/20261124-101500     # continue a stopped run (--epochs N extends it,
                                               # --batch-size N after running out of memory)

Every run writes a folder with config.toml, metrics.jsonl, checkpoints/, previews/, reward_curve.png,
summary.json and the kohya LoRA (<lora-name>.safetensors) that ComfyUI, A1111/Forge and diffusers load.
Ctrl-C stops cleanly: the last finished epoch is exported and can be resumed."""

# Flags whose names differ from their config field, or that take a special form.
_RENAMED = {"output_dir": "--out"}
_SPECIAL = {"rewards", "reward_options"}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keeps import-time notices out of the CLI output
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except PrdpError as exc:
        if args.debug and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: one line unless asked for the traceback
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prdp", description="Reward finetuning of Stable Diffusion LoRAs with PRDP (CVPR 2024): sample images, "
        "score them with reward models, train a LoRA that raises the reward, export it for ComfyUI, A1111 and "
        "diffusers.")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks of unexpected errors.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    train = commands.add_parser("train", help="Train a LoRA (no arguments: the embedded default on CPU).",
                                description="Train a LoRA with PRDP (or the DDPO baseline) on a reward mix.",
                                epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", metavar="FILE", help="A .toml or .json config; flags given here override it.")
    train.add_argument("--resume", metavar="RUN_DIR", help="Continue a stopped run from its last checkpoint.")
    train.add_argument("--reward", action="append", metavar="NAME[=WEIGHT]", dest="reward",
                       help="A reward and its weight (default 1), repeatable: --reward jpeg_compressibility=1 "
                            "--reward mymodule:score=0.5.")
    train.add_argument("--reward-option", action="append", metavar="NAME.KEY=VALUE", dest="reward_option",
                       help="A setting of one reward in the mix, repeatable: --reward-option "
                            "http.url=http://127.0.0.1:8765 --reward-option http.timeout=30 (VALUE is read as JSON "
                            "if it parses, else as text; merged into the config file's reward_options).")
    train.add_argument("--save-config", metavar="FILE", help="Write the resolved config to FILE and exit.")
    train.add_argument("--quiet", action="store_true", help="No progress bar, only the final summary.")
    train.add_argument("--low-vram", action="store_true",
                       help="Preset for 8 GB GPUs: " + ", ".join(f"{k}={v}" for k, v in LOW_VRAM.items()) +
                       " (flags given beside it win).")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in field_specs():
        if spec.name in _SPECIAL:
            continue
        group = groups.setdefault(spec.group, train.add_argument_group(f"{spec.group} options"))
        flag = _RENAMED.get(spec.name, "--" + spec.name.replace("_", "-"))
        kind = field_type(spec.name)
        extra = {"choices": spec.choices} if spec.choices else {}
        if kind is bool:
            group.add_argument(flag, dest=spec.name, default=argparse.SUPPRESS, action=argparse.BooleanOptionalAction,
                               help=f"{spec.help} (default: {'on' if spec.default else 'off'})")
            continue
        if kind is list:
            extra["type"] = lambda text: [t.strip() for t in text.split(",") if t.strip()]
            metavar = "A,B,..."
        else:
            extra["type"] = kind
            metavar = None if spec.choices else {int: "N", float: "X", str: "TEXT"}[kind]
        shown = ",".join(spec.default) if isinstance(spec.default, list) else spec.default
        group.add_argument(flag, dest=spec.name, default=argparse.SUPPRESS, metavar=metavar,
                           help=f"{spec.help} (default: {shown!s})".replace("%", "%%"), **extra)
    train.set_defaults(func=cmd_train)

    export = commands.add_parser("export", help="Export a run's LoRA in another format or precision.",
                                 description="Write the LoRA of a run folder's latest checkpoint as one file.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="A run folder written by prdp train.")
    export.add_argument("--out", required=True, metavar="FILE", help="Output .safetensors file.")
    export.add_argument("--format", choices=("kohya", "diffusers"), default="kohya",
                        help="kohya loads in ComfyUI, A1111/Forge and diffusers (default); diffusers loads only there.")
    export.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="Tensor precision.")
    export.add_argument("--name", help="Display name (ss_output_name, modelspec.title); default: the file name.")
    export.add_argument("--a1111-sidecar", action="store_true",
                        help="Also write A1111's card metadata <name>.json (sd version, reward mix) beside the file.")
    export.add_argument("--preview", metavar="IMAGE", help="An image to write as A1111's card thumbnail "
                        "<name>.preview.png.")
    export.set_defaults(func=cmd_export)

    sample = commands.add_parser("sample", help="Generate images with and without a LoRA on fixed seeds.",
                                 description="Generate images from a base model, and with --lora the same seeds "
                                 "with the LoRA applied, plus a side-by-side comparison.png.")
    sample.add_argument("--model", default=TrainConfig.model, help="Base model (as for train).")
    sample.add_argument("--lora", metavar="FILE", help="A LoRA .safetensors (kohya or diffusers format).")
    sample.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1.0).")
    sample.add_argument("--prompt", action="append", help="A prompt, repeatable.")
    sample.add_argument("--prompts", metavar="SOURCE", help="Prompt file or builtin set (as for train).")
    sample.add_argument("--seeds", default="0,1,2,3", help="Comma-separated seeds, one image each (default 0,1,2,3).")
    sample.add_argument("--steps", type=int, default=TrainConfig.num_steps, help="DDIM steps.")
    sample.add_argument("--guidance-scale", type=float, default=TrainConfig.guidance_scale, help="CFG scale.")
    sample.add_argument("--eta", type=float, default=TrainConfig.eta, help="DDIM eta.")
    sample.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    sample.add_argument("--out", required=True, metavar="DIR", help="Output folder.")
    sample.set_defaults(func=cmd_sample)

    score = commands.add_parser("score", help="Score images with a reward mix.",
                                description="Score image files with a reward mix; prints CSV (or JSON) with one "
                                "row per image and the mean.")
    score.add_argument("--reward", action="append", required=True, metavar="NAME[=WEIGHT]",
                       help="A reward and its weight, repeatable.")
    score.add_argument("--reward-option", action="append", metavar="NAME.KEY=VALUE", dest="reward_option",
                       help="A setting of one reward (as for train), repeatable.")
    score.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                       help="Weight dtype of model-based rewards (default fp32).")
    score.add_argument("--images", nargs="+", required=True, metavar="PATH", help="Image files or folders.")
    score.add_argument("--prompt", help="One prompt for every image.")
    score.add_argument("--prompts", metavar="FILE", help="One prompt per line, in the sorted order of the images. "
                       "Without --prompt/--prompts, a caption IMAGE.txt next to each image is used if present.")
    score.add_argument("--format", choices=("csv", "json"), default="csv")
    score.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    score.set_defaults(func=cmd_score)

    server = commands.add_parser(
        "reward-server", help="Serve one reward over HTTP, for the http reward of another machine or environment.",
        description='Serve a reward model over HTTP: POST {"images": [base64 PNG, ...], "prompts": [...]} answers '
        '{"scores": [...]}; GET /health answers the reward name. Train against it with --reward http '
        '--reward-option http.url=http://HOST:PORT.')
    server.add_argument("--reward", required=True, metavar="NAME", help="A registered reward or module:function.")
    server.add_argument("--reward-option", action="append", metavar="KEY=VALUE", dest="reward_option",
                        help="A setting of the reward, repeatable (VALUE read as JSON if it parses, else as text).")
    server.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1, this machine "
                        "only; the server has no authentication).")
    server.add_argument("--port", type=int, default=8765, help="Port (default 8765).")
    server.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    server.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="Weight dtype of a model-based reward (default fp32).")
    server.set_defaults(func=cmd_reward_server)

    ui = commands.add_parser("ui", help="Open the Gradio tab in the browser (needs the ui extra: pip install "
                             "'prdp-lora[ui]').", description="Serve the training tab on this machine, opening on the "
                             "embedded toy model.")
    ui.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1, this machine only; "
                    "the app has no authentication).")
    ui.add_argument("--port", type=int, default=7860, help="Port (default 7860).")
    ui.add_argument("--models", metavar="DIR", default="", help="A folder of checkpoints to offer as base models "
                    "(A1111 models/Stable-diffusion, ComfyUI models/checkpoints, or diffusers folders).")
    ui.add_argument("--loras", metavar="DIR", default="loras", help="Where exported LoRAs are saved (default loras).")
    ui.add_argument("--out", metavar="DIR", default="runs", help="Folder of the run folders (default runs).")
    ui.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    ui.set_defaults(func=cmd_ui)
    return parser


# ------------------------------------------------------------------------------------------------ train
def parse_reward_flags(flags: list[str]) -> dict[str, float]:
    """NAME[=WEIGHT] items; the weight follows the last '=' so module:function names keep their colons."""
    rewards = {}
    for item in flags:
        name, sep, weight = item.rpartition("=")
        if not sep:
            name, weight = item, "1"
        try:
            rewards[name.strip()] = float(weight)
        except ValueError:
            raise ConfigError(f"--reward {item!r}: the weight after '=' must be a number, e.g. "
                              f"--reward jpeg_compressibility=1.0.") from None
    return rewards


def parse_reward_option_flags(flags: list[str]) -> dict[str, dict]:
    """NAME.KEY=VALUE items as {name: {key: value}}; VALUE is JSON if it parses (30, true, [1, 2]), else text."""
    options: dict[str, dict] = {}
    for item in flags:
        target, sep, text = item.partition("=")
        name, dot, key = target.rpartition(".")
        if not (sep and dot and name.strip() and key.strip()):
            raise ConfigError(f"--reward-option {item!r} must look like NAME.KEY=VALUE, e.g. "
                              f"--reward-option http.url=http://127.0.0.1:8765.")
        options.setdefault(name.strip(), {})[key.strip()] = _option_value(text)
    return options


def _option_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(args) -> dict:
    names = {f.name for f in config_fields()}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if args.reward:
        values["rewards"] = parse_reward_flags(args.reward)
    if args.reward_option:
        values["reward_options"] = parse_reward_option_flags(args.reward_option)
    return values


def resolve_train_config(args) -> TrainConfig:
    config = TrainConfig.load(args.config) if args.config else TrainConfig()
    data = config.to_dict()
    if getattr(args, "low_vram", False):
        data.update(LOW_VRAM)
    overrides = _overrides(args)
    flag_options = overrides.pop("reward_options", {})
    data.update(overrides)
    # The file's options still apply to the rewards that stay in the mix; flags add to them, key by key.
    options = {name: dict(opts) for name, opts in data["reward_options"].items() if name in data["rewards"]}
    for name, opts in flag_options.items():
        options.setdefault(name, {}).update(opts)
    data["reward_options"] = options
    return TrainConfig.from_dict(data, source="flags")


def cmd_train(args) -> int:
    from .trainer import Trainer

    if args.resume:
        if args.config:
            raise ConfigError("--resume continues a run with its saved config; drop --config.")
        trainer = Trainer.resume(args.resume, **_overrides(args))
    else:
        config = resolve_train_config(args)
        if args.save_config:
            config.save(args.save_config)
            print(f"config written to {args.save_config}")
            return 0
        trainer = Trainer(config)
    reporter = _Reporter(trainer.config, quiet=args.quiet)
    trainer.on_event = reporter
    if trainer.processes.count > 1 and trainer.processes.is_main:
        print(trainer.processes.describe(trainer.config.prompts_per_epoch))
    stop, done = threading.Event(), threading.Event()
    outcome: dict = {}

    def work():
        try:
            outcome["lora"] = trainer.run(stop)
        except BaseException as exc:  # handed to the main thread, which reports it
            outcome["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=work, name="prdp-train", daemon=True)
    thread.start()
    # waits on `done`, not on thread.join(): a Ctrl-C inside join() can leave is_alive() False while the thread runs
    while not done.is_set():
        try:
            done.wait(0.2)
        except KeyboardInterrupt:
            if stop.is_set():
                raise
            print("\nstopping after the current step (Ctrl-C again to abort without exporting)...", file=sys.stderr)
            stop.set()
    reporter.close()
    trainer.processes.close()
    if "error" in outcome:
        raise outcome["error"]
    return 0


class _Reporter:
    """Turns trainer events into a tqdm bar and a few readable lines."""

    def __init__(self, config: TrainConfig, quiet: bool):
        self.config, self.quiet, self.bar = config, quiet, None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        kind = event.kind
        if kind == "RunStarted":
            self._print(f"run folder: {event.run_dir}" + (f" (resuming after epoch {event.start_epoch})"
                                                          if event.start_epoch else ""))
            self._print(f"model {self.config.model}, LoRA rank {self.config.lora_rank} alpha "
                        f"{self.config.lora_alpha:g} on {event.lora_modules} modules, objective {self.config.objective}")
            self._print(event.evaluation)
        elif kind == "Progress" and not self.quiet:
            label = event.phase if event.phase.startswith("eval") else \
                f"epoch {event.epoch}/{self.config.epochs} {event.phase}"
            if self.bar is None or self.bar.desc != label:
                self.close()
                self.bar = tqdm(total=event.total, desc=label, leave=False, file=sys.stderr, dynamic_ncols=True)
            self.bar.n = event.done
            self.bar.refresh()
        elif kind == "Evaluated":
            parts = [f"{name} {r['mean']:.4g} ± {r['se']:.2g}" for name, r in event.results.items()]
            self._print(f"eval {event.label}: " + ", ".join(parts))
        elif kind == "EpochEnd":
            m = event.metrics
            self._print(f"epoch {m['epoch']}/{self.config.epochs}: reward {m['reward_mean']:.4g} ± {m['reward_std']:.2g}"
                        f"  loss {m['loss']:.3g}  clipped {100 * m['clip_fraction']:.0f}%"
                        f"  ({m['timings']['total']:.1f} s)")
        elif kind == "Finished":
            self.close()
            if event.cancelled:
                print(f"stopped after epoch {event.summary.get('stopped_after_epoch')}; LoRA so far: {event.lora_path}\n"
                      f"continue with: prdp train --resume {event.run_dir}")
                return
            for name, ev in event.summary["eval"].items():
                before, after, delta = ev["before"], ev["after"], ev["delta"]
                print(f"{name} prompts: reward {before['mean']:.4g} ± {before['se']:.2g} -> {after['mean']:.4g} ± "
                      f"{after['se']:.2g} (change {delta['mean']:+.3g} ± {delta['se']:.2g} on the same seeds)")
            print(f"LoRA: {event.lora_path}\npreviews: {event.run_dir / 'previews'}  curve: "
                  f"{event.run_dir / 'reward_curve.png'}  ({event.summary['wall_time_s']:.0f} s)")

    def _print(self, text: str) -> None:
        from tqdm import tqdm

        if self.quiet:
            return
        tqdm.write(text, file=sys.stdout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------------------ export
def cmd_export(args) -> int:
    from .export import export_lora

    preview = None
    if args.preview:
        from PIL import Image, UnidentifiedImageError

        try:
            preview = Image.open(args.preview)
            preview.load()
        except (OSError, UnidentifiedImageError):
            raise ConfigError(f"--preview {args.preview} is not a readable image; pass a .png or .jpg file.") from None
    path = export_lora(args.run_dir, args.out, format=args.format, dtype=args.dtype, name=args.name,
                       sidecar=args.a1111_sidecar, preview=preview)
    print(f"LoRA written to {path}")
    return 0


# ------------------------------------------------------------------------------------------------ sample
def cmd_sample(args) -> int:
    import torch

    from .models import load_pipeline, resolve_device
    from .plots import image_grid
    from .prompts import load_prompts

    prompts = (args.prompt or []) + (load_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise ConfigError("no prompt given; pass --prompt TEXT (repeatable) or --prompts FILE.")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r} must be comma-separated integers, e.g. 0,1,2,3.") from None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output folder {out} is not writable ({exc.strerror}); choose another --out.") from None
    pipe = load_pipeline(args.model, "fp32", resolve_device(args.device))
    variants = ["base"]
    if args.lora:
        lora = Path(args.lora)
        if not lora.is_file():
            raise ConfigError(f"LoRA file {lora} does not exist.")
        from diffusers.utils import USE_PEFT_BACKEND

        if not USE_PEFT_BACKEND:
            raise PrdpError(f"--lora needs diffusers' PEFT backend, which needs transformers 4.34 or later (this "
                            f"environment has {importlib.metadata.version('transformers')}, pinned by A1111 1.10); "
                            f"compare with the LoRA in the webui itself, or run prdp sample in another environment.")
        try:
            # folder + weight_name: diffusers before the fix of its issue 14195 refuses a bare file path offline
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="prdp")
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise PrdpError(f"LoRA {lora} does not fit model {args.model}: {library_reason(exc)}") from None
        pipe.set_adapters(["prdp"], adapter_weights=[args.lora_scale])
        variants.append("lora")
    rows, titles = [], []
    for j, prompt in enumerate(prompts):
        for variant in variants:
            if args.lora:
                pipe.enable_lora() if variant == "lora" else pipe.disable_lora()
            images = []
            for seed in seeds:
                image = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta,
                             generator=torch.Generator("cpu").manual_seed(seed)).images[0]
                (out / variant).mkdir(exist_ok=True)
                image.save(out / variant / f"p{j:03d}_s{seed}.png")
                images.append(image)
            rows.append(images)
            titles.append(f"{variant}: {prompt}")
    image_grid(rows, [[f"seed {s}" for s in seeds]] * len(rows), titles).save(out / "comparison.png")
    print(f"{len(prompts) * len(seeds) * len(variants)} images and comparison.png written to {out}")
    return 0


# ------------------------------------------------------------------------------------------------ score
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def cmd_score(args) -> int:
    from PIL import Image

    from .models import resolve_device
    from .prompts import load_prompts
    from .rewards import RewardMix

    files = []
    for item in args.images:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"image path {path} does not exist.")
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {' '.join(args.images)}.")
    if args.prompt is not None:
        prompts = [args.prompt] * len(files)
    elif args.prompts:
        prompts = load_prompts(args.prompts)
        if len(prompts) != len(files):
            raise ConfigError(f"{args.prompts} has {len(prompts)} prompts for {len(files)} images; give one per image.")
    else:
        prompts = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() if p.with_suffix(".txt").is_file() else ""
                   for p in files]
    mix = RewardMix(parse_reward_flags(args.reward), device=resolve_device(args.device), dtype=args.dtype,
                    options=parse_reward_option_flags(args.reward_option or []))
    images = []
    for path in files:
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError:
            raise ConfigError(f"{path} is not a readable image.") from None
    total, components = mix.score(images, prompts)
    names = list(components)
    if args.format == "json":
        rows = [{"image": str(f), "prompt": p, "total": total[i].item(),
                 **{n: components[n][i].item() for n in names}} for i, (f, p) in enumerate(zip(files, prompts))]
        means = {"total": total.mean().item(), **{n: components[n].mean().item() for n in names}}
        print(json.dumps({"reward": mix.describe(), "images": rows, "mean": means}, indent=2))
    else:
        print(",".join(["image", "total", *names]))
        for i, path in enumerate(files):
            print(",".join([_csv(str(path)), f"{total[i].item():.6g}", *(f"{components[n][i].item():.6g}" for n in names)]))
        print(",".join(["mean", f"{total.mean().item():.6g}", *(f"{components[n].mean().item():.6g}" for n in names)]))
    return 0


def _csv(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


# ------------------------------------------------------------------------------------------------ reward-server
def cmd_reward_server(args) -> int:
    from .models import resolve_device
    from .reward_server import serve
    from .rewards import create_reward

    options = {}
    for item in args.reward_option or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--reward-option {item!r} must look like KEY=VALUE, e.g. --reward-option timeout=30.")
        options[key.strip()] = _option_value(text)
    reward = create_reward(args.reward, device=resolve_device(args.device), dtype=args.dtype, options=options)
    serve(reward, args.host, args.port)
    return 0


# ------------------------------------------------------------------------------------------------ ui
def cmd_ui(args) -> int:
    if importlib.util.find_spec("gradio") is None:  # the tab (prdp_ui) imports it; the engine never does
        raise PrdpError("the tab needs Gradio, which is not installed; install it with pip install "
                        "'prdp-lora[ui]'.")
    from prdp_ui import HostContext, build_tab, discover_models

    from .network import LOOPBACK_HOSTS

    if args.host not in LOOPBACK_HOSTS:
        print(f"warning: serving on {args.host} lets other machines start training runs here (no authentication).",
              file=sys.stderr)
    context = HostContext(models=discover_models(args.models), lora_dir=Path(args.loras), output_dir=Path(args.out),
                          device=args.device)
    build_tab(context).queue().launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
