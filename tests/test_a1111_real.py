"""The extension in a real A1111 or Forge webui, as a user runs it: linked into the webui's extensions folder,
install.py run as the webui runs it, the webui launched offline on the CPU on 127.0.0.1, then in Debian's chromium:
the PRDP tab trains a short toy run, exports it, and the LoRA shows in the webui's Lora tab. While the run holds the
webui's queue lock a txt2img request through the webui's API waits for it.

Skipped unless FORGE_DIR and/or A1111_DIR point to checkouts (lllyasviel/stable-diffusion-webui-forge,
AUTOMATIC1111/stable-diffusion-webui 1.10.x; never commit their code), with FORGE_PYTHON / A1111_PYTHON the Python
of a venv holding that webui's requirements (for Forge: ../shared/tools/forge_venv.sh). PRDP_SCREENSHOT_DIR keeps
the screenshots. Takes about 2 minutes per webui here; not part of CI, which cannot fetch the webuis."""

import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tab_driver import click_tab, free_port, set_field, start_short_toy_run, wait_until_serving

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("PRDP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# the webui's own CPU flags; no model download, no environment preparation (the venv has the webui's requirements)
HOSTS = {
    "forge": ["--always-cpu"],
    "a1111": ["--use-cpu", "all", "--no-half", "--precision", "full"],
}
EPOCHS = 4  # about 6 s each here: time to queue a generation while the run holds the lock
COMMON_FLAGS = ["--skip-prepare-environment", "--skip-torch-cuda-test", "--no-download-sd-model", "--api"]
SET_UP = [host for host in HOSTS if os.environ.get(f"{host.upper()}_DIR")]
pytestmark = pytest.mark.skipif(not SET_UP, reason="set FORGE_DIR / A1111_DIR (and *_PYTHON) to run a real webui")


@pytest.fixture(scope="module", params=SET_UP)
def webui(request, tmp_path_factory):
    """The webui serving on a free port with a data folder of its own (extensions/, models/, outputs/) that holds a
    link to this checkout; yields (name, url, data folder, server log)."""
    name = request.param
    webui_dir = Path(os.environ[f"{name.upper()}_DIR"]).resolve()
    python = os.environ.get(f"{name.upper()}_PYTHON", "python")
    data = tmp_path_factory.mktemp(name)
    (data / "extensions").mkdir()
    (data / "extensions" / "prdp-lora").symlink_to(ROOT, target_is_directory=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}

    # install.py as the webui's launch_utils.run_extension_installer runs it: its root on PYTHONPATH
    installed = subprocess.run([python, str(ROOT / "install.py")], cwd=webui_dir, capture_output=True, text=True,
                               env={**env, "PYTHONPATH": str(webui_dir)}, timeout=600)
    print(f"install.py ({installed.returncode}):", installed.stdout, installed.stderr)
    assert installed.returncode == 0 and "Traceback" not in installed.stderr

    port, log = free_port(), data / "server.log"
    # a data folder of its own; the webui's own folder stays servable (its javascript/, script.js, style.css)
    command = [python, "launch.py", *COMMON_FLAGS, *HOSTS[name], "--data-dir", str(data),
               "--gradio-allowed-path", str(webui_dir), "--server-name", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=webui_dir, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, server, log, 180, "the webui")
        yield name, url, data, log
    finally:
        server.terminate()
        server.wait(60)
        print(f"--- {name} server log ---\n{log.read_text()[-6000:]}")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "the real-webui test needs Debian's chromium (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def _txt2img_while_training(url: str, returned: dict) -> threading.Thread:
    """A txt2img request through the webui's API, timed; the webui has no checkpoint here, so it fails once it
    gets the queue lock, which is all this needs."""
    def request():
        body = b'{"prompt": "a red circle", "steps": 1, "width": 64, "height": 64}'
        post = urllib.request.Request(url + "sdapi/v1/txt2img", data=body, headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(post, timeout=900)
        except urllib.error.HTTPError:
            pass
        returned["at"] = time.monotonic()
    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    return thread


def test_toy_run_export_and_lora_card_in_the_webui(webui, browser):
    from playwright.sync_api import expect

    name, url, data, log = webui
    shots = Path(os.environ.get("PRDP_SCREENSHOT_DIR") or data)
    page = browser.new_page(viewport={"width": 1500, "height": 2000})
    page.goto(url, timeout=120_000)
    click_tab(page, "PRDP LoRA")
    status, message = start_short_toy_run(page, EPOCHS)
    expect(status).to_contain_text("running", timeout=60_000)
    returned = {}
    waiting = _txt2img_while_training(url, returned)
    # the webui's own Generate waits in its queue too, and says what for
    click_tab(page, "Txt2img")
    page.locator("#txt2img_generate").click()
    queued = page.locator(".progressDiv .progress").first
    expect(queued).to_contain_text("waiting for the PRDP LoRA training run", timeout=60_000)
    page.screenshot(path=str(shots / f"{name}_generation_waits.png"))
    click_tab(page, "PRDP LoRA")
    expect(status).to_contain_text(f"finished · {EPOCHS} of {EPOCHS} epochs", timeout=600_000)
    finished_at = time.monotonic()
    waiting.join(300)
    assert returned["at"] >= finished_at - 2.0, "a txt2img request ran while the PRDP run held the GPU"

    set_field(page, "export_name", "webui_lora")
    page.get_by_role("button", name="export", exact=True).click()
    expect(page.locator("#prdp_export_message").last).to_contain_text("<lora:webui_lora:1>", timeout=60_000)
    lora = data / "models" / "Lora" / "webui_lora.safetensors"
    assert lora.is_file() and lora.with_suffix(".json").is_file() and (lora.parent / "webui_lora.preview.png").is_file()
    assert list((data / "outputs" / "prdp").iterdir()), "the run folder is under the webui's outputs"
    page.wait_for_timeout(1500)
    page.screenshot(path=str(shots / f"{name}_prdp_tab.png"), full_page=True)

    # the webui's Lora tab lists the new LoRA after its refresh, with the card's thumbnail
    click_tab(page, "Txt2img")
    page.locator("#txt2img_extra_tabs").get_by_role("tab", name="Lora").click()
    page.locator("#txt2img_lora_extra_refresh").first.click()  # the webui's script moves it into the tab bar
    card = page.locator("#txt2img_lora_cards .card[data-name='webui_lora']")
    expect(card).to_be_visible(timeout=60_000)
    expect(card).to_contain_text("PRDP", timeout=10_000)  # the card's description from our <name>.json
    card.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / f"{name}_lora_card.png"))

    server_log = log.read_text()
    assert "Error loading script: prdp_lora.py" not in server_log and "PRDP tab unavailable" not in server_log
