"""The node pack in a real ComfyUI, as a user runs it. Skipped unless COMFYUI_DIR names a ComfyUI checkout
(Comfy-Org/ComfyUI, 0.3.60 or later); nothing of ComfyUI is part of this repository.

    COMFYUI_DIR=~/ComfyUI COMFYUI_PYTHON=~/comfy-venv/bin/python python -m pytest -s tests/test_comfyui_real.py

COMFYUI_PYTHON is a Python with ComfyUI's requirements and this pack's requirements.txt installed (default: this
one). The test links the pack into custom_nodes/ of a fresh --base-directory (the checkout is left untouched),
starts `main.py --cpu` on 127.0.0.1, and then:
  1. queues example_workflows/prdp_toy_train.json, in Debian's chromium when Playwright and chromium are there (the
     screenshot goes to PRDP_SCREENSHOT, default <base>/comfyui_workflow.png), else through the HTTP API, waits for
     it in /history, and checks the LoRA in models/loras and the node's images;
  2. interrupts a shorter run through /interrupt once its first epoch is saved, queues it again (it resumes), and
     compares its LoRA with the same run uninterrupted: equal tensors;
  5. reads the server log: the pack imported, no traceback of ours, every LoRA key loaded.
  4. trains a LoRA on a random-weight SD1.5 checkpoint in models/checkpoints at 64 px, applies it with ComfyUI's
     own Load LoRA Model to the MODEL of Load Checkpoint in the same graph, samples, decodes and scores the image;
It prints a JSON summary (timings, files) for the issue note."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
CHROMIUM = os.environ.get("PRDP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the pack in it")


class Server:
    def __init__(self, base: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.log = open(self.log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
             "--base-directory", str(base)], cwd=COMFYUI_DIR, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait_for(lambda: self.get("/system_stats"), 180, "ComfyUI to serve")

    def get(self, path: str):
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return json.loads(response.read())
        except OSError:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited; see {self.log_path}") from None
            return None

    def post(self, path: str, body=None):
        request = urllib.request.Request(self.url + path, data=json.dumps({} if body is None else body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]

    def result(self, prompt_id: str, timeout: float) -> dict:
        """The prompt's /history entry once it has ended (success, error or interrupted)."""
        return self.wait_for(lambda: self.get(f"/history/{prompt_id}").get(prompt_id), timeout, "the prompt")

    def wait_for(self, check, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = check()
            if value:
                return value
            time.sleep(1)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}; see {self.log_path}")

    def stop(self):
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def api_prompt(workflow: dict, object_info: dict) -> dict:
    """A UI workflow (what ComfyUI saves and loads) as the API prompt /prompt takes: widget values matched to input
    names in the nodes' declared order (an input with a control_after_generate widget has one value more)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        declared = object_info[node["type"]]["input"]
        order = object_info[node["type"]]["input_order"]
        values, inputs = iter(node["widgets_values"]), {}
        for section in ("required", "optional"):
            for name in order.get(section, []):
                kind, options = (declared[section][name] + [{}])[:2]
                if isinstance(kind, list) or kind in WIDGET_TYPES:
                    inputs[name] = next(values)
                    if options.get("control_after_generate", name in ("seed", "noise_seed")):
                        next(values)
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def lora_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def run_in_browser(server: Server, workflow: dict, screenshot: Path) -> str | None:
    """Load the workflow in ComfyUI's page, queue it there as a user would, wait, and take the screenshot; None when
    there is no browser here."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not CHROMIUM:
        return None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        server.post("/settings/Comfy.TutorialCompleted", True)  # no template browser over the canvas at first start
        server.post("/settings/Comfy.Minimap.Visible", False)  # nor the minimap over the grid
        page.goto(server.url)
        page.wait_for_function("window.app && window.app.graph", timeout=120_000)
        page.evaluate("workflow => window.app.loadGraphData(workflow)", workflow)
        before = set(server.get("/history") or {})
        page.evaluate("() => window.app.queuePrompt(0)")
        prompt_id = server.wait_for(lambda: _new_prompt(server, before), 60, "the prompt the page queued")
        server.result(prompt_id, 1800)
        page.wait_for_timeout(3000)  # the preview images arrive over the websocket
        page.evaluate("() => { const ds = window.app.canvas.ds; ds.scale = 0.78; ds.offset = [80, 60]; "
                      "window.app.graph.setDirtyCanvas(true, true); }")
        page.wait_for_timeout(1000)
        page.screenshot(path=str(screenshot))
        browser.close()
    return prompt_id


def _new_prompt(server: Server, before: set) -> str | None:
    queue = server.get("/queue") or {}
    queued = {item[1] for item in queue.get("queue_running", []) + queue.get("queue_pending", [])}
    return next(iter(queued | set(server.get("/history") or {}) - before), None)


def _tracebacks(log: str) -> list[str]:
    """Each Python traceback in a log: its header, its indented frames, its exception line."""
    found, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = i + 1
            while end < len(lines) and lines[end].startswith(" "):
                end += 1
            found.append("\n".join(lines[i:end + 1]))
    return found


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    """A ComfyUI server with the pack linked in, its base folder, /object_info, and the summary printed at the end."""
    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "prdp-lora").symlink_to(ROOT)  # the folder name a Registry install would give it
    version = Path(COMFYUI_DIR) / "comfyui_version.py"
    summary = {"comfyui": version.read_text().split("__version__ = ")[-1].strip().strip('"')
               if version.is_file() else COMFYUI_DIR}
    started = time.time()
    server = Server(base)
    summary["server_start_s"] = round(time.time() - started, 1)
    try:
        yield type("ComfyUI", (), {"server": server, "base": base, "info": server.get("/object_info"),
                                   "summary": summary})
    finally:
        server.stop()
        print(json.dumps(summary, indent=2))


def train_node_id(prompt: dict) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == "PRDPTrainLoRA")


def example_prompt(comfyui) -> dict:
    workflow = json.loads((ROOT / "example_workflows" / "prdp_toy_train.json").read_text())
    return api_prompt(workflow, comfyui.info)


def advanced_settings(comfyui, **changes) -> dict:
    """An API-prompt PRDP Advanced Settings node: the defaults, then `changes`."""
    declared = comfyui.info["PRDPAdvancedSettings"]["input"]["required"]
    return {"class_type": "PRDPAdvancedSettings",
            "inputs": {**{name: spec[1]["default"] for name, spec in declared.items()}, **changes}}


def test_the_pack_loads_with_its_nodes_and_template(comfyui):
    ours = {name for name, node in comfyui.info.items() if node.get("category") == "PRDP"}
    assert ours == {"PRDPReward", "PRDPTrainLoRA", "PRDPAdvancedSettings", "PRDPScoreImages", "PRDPExportLoRA"}
    assert comfyui.server.get("/api/workflow_templates")["prdp-lora"] == ["prdp_toy_train"]  # Browse Templates


def test_the_example_workflow_trains_and_shows_its_pictures(comfyui):
    server, base, summary = comfyui.server, comfyui.base, comfyui.summary
    workflow = json.loads((ROOT / "example_workflows" / "prdp_toy_train.json").read_text())
    prompt = example_prompt(comfyui)
    screenshot = Path(os.environ.get("PRDP_SCREENSHOT", base / "comfyui_workflow.png"))
    started = time.time()
    prompt_id = run_in_browser(server, workflow, screenshot)
    summary["example_via"] = "chromium" if prompt_id else "http"
    if prompt_id is None:
        prompt_id = server.queue(prompt)
    entry = server.result(prompt_id, 1800)
    summary["example_workflow_s"] = round(time.time() - started, 1)
    assert entry["status"]["status_str"] == "success", entry["status"]
    train_id = train_node_id(prompt)
    lora = base / "models" / "loras" / (prompt[train_id]["inputs"]["lora_name"] + ".safetensors")
    assert lora.is_file() and lora.with_suffix(".json").is_file() and lora.with_suffix(".preview.png").is_file()
    assert all(key.startswith("lora_unet_") for key in lora_tensors(lora))
    shown = entry["outputs"][train_id]["images"][0]
    assert (base / "output" / shown["subfolder"] / shown["filename"]).is_file()
    previews = [o["images"][0] for k, o in entry["outputs"].items() if prompt[k]["class_type"] == "PreviewImage"]
    assert len(previews) == 2  # the grid and the curve reached ComfyUI's own PreviewImage nodes
    texts = [o["text"][0] for k, o in entry["outputs"].items() if prompt[k]["class_type"] == "PreviewAny"]
    assert texts == [lora.name]  # the template shows where the LoRA went
    summary.update(lora=str(lora), screenshot=str(screenshot) if screenshot.is_file() else None)

    started = time.time()
    entry = server.result(server.queue(prompt), 120)  # the same prompt again: ComfyUI's cache, no training
    cached = next(m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached")
    assert train_id in cached
    summary["same_prompt_again_s"] = round(time.time() - started, 1)


def test_interrupt_then_queue_again_resumes_to_the_same_lora(comfyui):
    server, base, summary = comfyui.server, comfyui.base, comfyui.summary
    short = example_prompt(comfyui)
    train_id = train_node_id(short)
    short[train_id]["inputs"].update(epochs=3, images_per_prompt=8, num_steps=10, seed=1, lora_name="resumed",
                                     advanced=["90", 0])
    short["90"] = advanced_settings(comfyui, eval_images_per_prompt=2, eval_max_prompts=4)
    runs = base / "output" / "prdp"
    runs_before = set(runs.iterdir())
    started = time.time()
    first = server.queue(short)
    checkpoint = server.wait_for(lambda: next((p for p in runs.glob("*/checkpoints/epoch-0001")
                                               if p.parents[1] not in runs_before), None), 900, "the first epoch")
    server.post("/interrupt")
    entry = server.result(first, 300)
    messages = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in messages, messages
    run_dir = checkpoint.parents[1]
    assert not (run_dir / "summary.json").exists()
    assert server.result(server.queue(short), 900)["status"]["status_str"] == "success"
    summary["interrupted_and_resumed_s"] = round(time.time() - started, 1)
    assert (run_dir / "summary.json").is_file()  # the same run folder, finished
    uninterrupted = json.loads(json.dumps(short))
    uninterrupted[train_id]["inputs"].update(resume=False, lora_name="uninterrupted")
    assert server.result(server.queue(uninterrupted), 900)["status"]["status_str"] == "success"
    loras = base / "models" / "loras"
    resumed, whole = (lora_tensors(loras / f"{name}.safetensors") for name in ("resumed", "uninterrupted"))
    assert resumed.keys() == whole.keys() and all((resumed[k] == whole[k]).all() for k in resumed)
    summary["resumed_equals_uninterrupted"] = True


def test_the_lora_applies_to_the_checkpoints_model_in_the_same_graph(comfyui):
    """SD1.5's real architecture (random weights, 64 px to stay quick on a CPU): Load Checkpoint's MODEL gets the
    trained LORA_MODEL through ComfyUI's own Load LoRA Model, then samples; the image is scored."""
    server, base, summary = comfyui.server, comfyui.base, comfyui.summary
    checkpoint = base / "models" / "checkpoints" / "random-sd15.safetensors"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    write_random_sd15(checkpoint)
    server.get("/object_info")  # ComfyUI lists the new file when asked again
    prompt_text = "a photo of a cat"
    mix = {"class_type": "PRDPReward", "inputs": {"reward": "jpeg_compressibility", "weight": 1.0, "options": "{}",
                                                  "custom": ""}}
    train = example_prompt(comfyui)[train_node_id(example_prompt(comfyui))]
    train["inputs"].update(model=checkpoint.name, reward_mix=["2", 0], prompts=prompt_text, eval_prompts="",
                           epochs=1, prompts_per_epoch=1, images_per_prompt=2, num_steps=2, lora_rank=4,
                           lora_alpha=8.0, lora_name="sd15_reward", advanced=["3", 0])
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.name}},
        "2": mix,
        "3": advanced_settings(comfyui, resolution=64, batch_size=2, updates_per_epoch=1, eval_images_per_prompt=1,
                               eval_max_prompts=1),
        "4": train,
        "5": {"class_type": "LoraModelLoader", "inputs": {"model": ["1", 0], "lora": ["4", 0], "strength_model": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt_text, "clip": ["1", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 0, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["6", 0],
                                                   "negative": ["7", 0], "latent_image": ["8", 0], "denoise": 1.0}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "PRDPScoreImages", "inputs": {"images": ["10", 0], "reward_mix": ["2", 0],
                                                           "prompts": prompt_text}},
    }
    started = time.time()
    entry = server.result(server.queue(prompt), 1800)
    summary["sd15_same_graph_s"] = round(time.time() - started, 1)
    assert entry["status"]["status_str"] == "success", entry["status"]
    table = entry["outputs"]["11"]["text"][0]
    assert table.splitlines()[1].split()[0] == "1"  # one scored image
    summary["sd15_score_table"] = table
    lora = lora_tensors(base / "models" / "loras" / "sd15_reward.safetensors")
    summary["sd15_lora_tensors"] = len(lora)
    assert len(lora) == 576  # kohya's SD1 targets: 16 transformers x 12 modules x (down, up, alpha)


def write_random_sd15(path: Path) -> None:
    """An SD1.5 checkpoint in the original (LDM) layout, as A1111 and ComfyUI keep them, with random fp16 weights."""
    sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
    try:
        import single_file_real_size as real_size
    finally:
        del sys.path[:2]
    import torch
    from safetensors.torch import save_file

    from prdp_core.clip_tokenizer import CONFIGS_DIR

    torch.manual_seed(0)
    save_file(real_size.original_layout("sd15", real_size.random_components(CONFIGS_DIR / "sd15")), path)


def test_the_server_log_is_clean(comfyui):
    log = comfyui.server.log_path.read_text()
    import_line = next((line for line in log.splitlines() if "prdp-lora" in line and "seconds" in line), "")
    comfyui.summary["import_line"] = import_line.strip()
    assert import_line and "IMPORT FAILED" not in import_line
    tracebacks = _tracebacks(log)
    ours = [trace for trace in tracebacks if "prdp" in trace.lower()]
    assert not ours, ours[0]  # ComfyUI may log others' (e.g. its audio nodes without torchaudio)
    comfyui.summary["other_tracebacks_in_log"] = len(tracebacks)
    assert "lora key not loaded" not in log  # every key of every LoRA applied found its weight
    assert "epoch 16/16: reward" in log and "[PRDP] continuing" in log
