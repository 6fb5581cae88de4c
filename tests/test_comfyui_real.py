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
  3. reads the server log: the pack imported, no traceback.
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

    def post(self, path: str, body: dict | None = None):
        request = urllib.request.Request(self.url + path, data=json.dumps(body or {}).encode(),
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
        page.evaluate("() => { const ds = window.app.canvas.ds; ds.scale = 1; ds.offset = [70, 70]; "
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


def test_the_pack_in_a_real_comfyui(tmp_path):
    base = tmp_path / "comfyui_base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "prdp-lora").symlink_to(ROOT)  # the folder name a Registry install would give it
    summary = {"comfyui": subprocess.run(["git", "describe", "--tags", "--always"], cwd=COMFYUI_DIR,
                                         capture_output=True, text=True).stdout.strip() or COMFYUI_DIR}
    started = time.time()
    server = Server(base)
    summary["server_start_s"] = round(time.time() - started, 1)
    try:
        info = server.get("/object_info")
        ours = {name for name, node in info.items() if node.get("category") == "PRDP"}
        assert ours == {"PRDPReward", "PRDPTrainLoRA", "PRDPAdvancedSettings", "PRDPScoreImages", "PRDPExportLoRA"}
        assert server.get("/api/workflow_templates")["prdp-lora"] == ["prdp_toy_train"]  # Browse Templates lists it

        # 1. the example workflow, as shipped
        workflow = json.loads((ROOT / "example_workflows" / "prdp_toy_train.json").read_text())
        prompt = api_prompt(workflow, info)
        screenshot = Path(os.environ.get("PRDP_SCREENSHOT", base / "comfyui_workflow.png"))
        started = time.time()
        prompt_id = run_in_browser(server, workflow, screenshot)
        summary["example_via"] = "chromium" if prompt_id else "http"
        if prompt_id is None:
            prompt_id = server.queue(prompt)
        entry = server.result(prompt_id, 1800)
        summary["example_workflow_s"] = round(time.time() - started, 1)
        assert entry["status"]["status_str"] == "success", entry["status"]
        train_id = next(k for k, v in prompt.items() if v["class_type"] == "PRDPTrainLoRA")
        lora_name = prompt[train_id]["inputs"]["lora_name"] + ".safetensors"
        lora = base / "models" / "loras" / lora_name
        assert lora.is_file() and lora.with_suffix(".json").is_file() and lora.with_suffix(".preview.png").is_file()
        assert all(key.startswith("lora_unet_") for key in lora_tensors(lora))
        shown = entry["outputs"][train_id]["images"][0]
        assert (base / "output" / shown["subfolder"] / shown["filename"]).is_file()
        previews = [o["images"][0] for k, o in entry["outputs"].items() if prompt[k]["class_type"] == "PreviewImage"]
        assert len(previews) == 2  # the grid and the curve reached ComfyUI's own PreviewImage nodes
        summary.update(lora=str(lora), screenshot=str(screenshot) if screenshot.is_file() else None)
        started = time.time()
        entry = server.result(server.queue(prompt), 120)  # the same prompt again: ComfyUI's cache, no training
        cached = next(m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached")
        assert train_id in cached
        summary["same_prompt_again_s"] = round(time.time() - started, 1)

        # 2. interrupt a shorter run after its first epoch, queue it again, compare with an uninterrupted one
        short = json.loads(json.dumps(prompt))
        short[train_id]["inputs"].update(epochs=3, images_per_prompt=8, num_steps=10, seed=1, lora_name="resumed")
        short["90"] = {"class_type": "PRDPAdvancedSettings", "inputs": {
            name: (options[1]["default"] if len(options) > 1 else None)
            for name, options in info["PRDPAdvancedSettings"]["input"]["required"].items()}}
        short["90"]["inputs"].update(eval_images_per_prompt=2, eval_max_prompts=4)
        short[train_id]["inputs"]["advanced"] = ["90", 0]
        runs_before = set((base / "output" / "prdp").iterdir())
        started = time.time()
        first = server.queue(short)
        checkpoint = server.wait_for(lambda: next(
            (p for p in (base / "output" / "prdp").glob("*/checkpoints/epoch-0001") if p.parents[1] not in
             runs_before), None), 900, "the first epoch's checkpoint")
        server.post("/interrupt")
        entry = server.result(first, 300)
        messages = [m[0] for m in entry["status"]["messages"]]
        assert "execution_interrupted" in messages, messages
        run_dir = checkpoint.parents[1]
        assert not (run_dir / "summary.json").exists()
        second = server.queue(short)
        assert server.result(second, 900)["status"]["status_str"] == "success"
        summary["interrupted_and_resumed_s"] = round(time.time() - started, 1)
        assert (run_dir / "summary.json").is_file()  # the same run folder, finished
        uninterrupted = json.loads(json.dumps(short))
        uninterrupted[train_id]["inputs"].update(resume=False, lora_name="uninterrupted")
        assert server.result(server.queue(uninterrupted), 900)["status"]["status_str"] == "success"
        resumed, whole = (lora_tensors(base / "models" / "loras" / f"{n}.safetensors")
                          for n in ("resumed", "uninterrupted"))
        assert resumed.keys() == whole.keys() and all((resumed[k] == whole[k]).all() for k in resumed)
        summary["resumed_equals_uninterrupted"] = True
    finally:
        server.stop()

    # 3. the log
    log = server.log_path.read_text()
    import_line = next((line for line in log.splitlines() if "prdp-lora" in line and "seconds" in line), "")
    summary["import_line"] = import_line.strip()
    assert import_line and "IMPORT FAILED" not in import_line
    tracebacks = _tracebacks(log)
    ours = [trace for trace in tracebacks if "prdp" in trace.lower()]
    assert not ours, ours[0]  # ComfyUI may log others' (e.g. its audio nodes without torchaudio)
    summary["other_tracebacks_in_log"] = len(tracebacks)
    assert "[PRDP] epoch 16/16: reward" in log and "[PRDP] continuing" in log
    print(json.dumps(summary, indent=2))
