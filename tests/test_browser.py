"""The standalone tab in a real browser: Playwright drives Debian's chromium against `prdp ui` on 127.0.0.1 through a
short toy run (start, watch the curve and gallery, stop, resume, export) and the exported file loads in diffusers.

Needs the system chromium (`apt-get install chromium`) and the `playwright` package; never downloads a browser.
Skipped without them, except where PRDP_REQUIRE_BROWSER=1 (CI) makes a missing browser a failure. Host
worlds: PRDP_HOST_PYTHONS="/.venv-a1111/bin/python /.venv-forge/bin/python" runs the same test with each of those
interpreters serving the tab the way A1111/Forge mount it, as a tab of the host's own Blocks (each venv holds that
webui's pinned libraries and prdp-lora, see .ci/run)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tab_driver import click_tab, free_port, set_field, start_short_toy_run, wait_until_serving

CHROMIUM = os.environ.get("PRDP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
PYTHONS = [sys.executable, *os.environ.get("PRDP_HOST_PYTHONS", "").split()]
EPOCHS = 8  # 1-2 s each here: room to stop after the first and still have epochs left to resume
HOST_TAB = "PRDP"
pytestmark = pytest.mark.slow  # a server and a browser per Gradio world: the fast lane leaves it out
# How A1111 and Forge show an extension's tab (modules/ui.py): its Blocks rendered inside a TabItem of their own.
MOUNTED_IN_A_HOST = f"""
import sys
from pathlib import Path
import gradio as gr
from prdp_ui import HostContext, build_tab

port, out, loras = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
tab = build_tab(HostContext(output_dir=out, lora_dir=loras))
with gr.Blocks(analytics_enabled=False) as host:
    with gr.Tabs():
        with gr.TabItem("txt2img"):
            gr.Markdown("the host's own tab")
        with gr.TabItem("{HOST_TAB}"):
            tab.render()
host.queue().launch(server_name="127.0.0.1", server_port=port)
"""


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not CHROMIUM:
        if os.environ.get("PRDP_REQUIRE_BROWSER") == "1":
            pytest.fail("the browser test needs the playwright package and Debian's chromium "
                        "(apt-get install chromium)")
        pytest.skip("no playwright package or no system chromium")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(params=PYTHONS, ids=lambda python: Path(python).parents[1].name)  # the venv's folder name
def app(request, tmp_path):
    """The tab served on a free local port: `prdp ui` by this interpreter, mounted in a host's Blocks by the others.
    Yields (url, whether it is mounted, loras folder, server log)."""
    port, log, mounted = free_port(), tmp_path / "server.log", request.param != sys.executable
    folders = [str(tmp_path / "runs"), str(tmp_path / "loras")]
    command = ["-c", MOUNTED_IN_A_HOST, str(port), *folders] if mounted else \
        ["-m", "prdp_core.cli", "ui", "--port", str(port), "--out", folders[0], "--loras", folders[1]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        server = subprocess.Popen([request.param, *command], stdout=out, stderr=subprocess.STDOUT, env=env,
                                  cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, server, log, 120, "prdp ui")
        yield url, mounted, tmp_path / "loras", log
    finally:
        server.terminate()
        server.wait(30)


def test_short_toy_run_in_the_browser(browser, app, tmp_path):
    from playwright.sync_api import expect

    url, mounted, loras, log = app
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(url)
    if mounted:
        click_tab(page, HOST_TAB)
    estimate = page.locator("#prdp_estimate").last
    expect(estimate).to_contain_text("the evaluation samples", timeout=60_000)  # its size in plain view
    expect(page.locator("#prdp_stop button, button#prdp_stop").first).to_be_disabled()  # nothing to stop yet
    expect(page.locator("#prdp_export button, button#prdp_export").first).to_be_disabled()
    page.screenshot(path=str(tmp_path / "first_view.png"), full_page=True)
    page.get_by_role("button", name=re.compile("quick-try settings")).click()
    expect(page.locator("#prdp_epochs input")).to_have_value("2", timeout=30_000)
    # a config file that does not load changes no field and says what is wrong, with the user's file name
    set_field(page, "seed", 7)
    broken = tmp_path / "broken.toml"
    broken.write_text("epochs = \n")
    page.locator("#prdp_load_config input[type=file]").set_input_files(str(broken))
    config_message = page.locator("#prdp_config_message .prdp-error")  # styled as an error
    expect(config_message).to_contain_text("Not loaded: config file broken.toml is not valid TOML", timeout=30_000)
    assert page.locator("#prdp_seed input").input_value() == "7"
    page.screenshot(path=str(tmp_path / "bad_upload.png"), full_page=True)
    status, message = start_short_toy_run(page, EPOCHS)
    expect(page.locator("#prdp_start button, button#prdp_start").first).to_be_disabled()  # one run at a time
    expect(status).to_contain_text(f"epoch 1 of {EPOCHS}", timeout=120_000)  # counted from 1, in words
    expect(status.locator(".prdp-progress")).to_have_count(1)
    expect(status).to_contain_text(re.compile(r"elapsed · about \d+:\d\d left"), timeout=60_000)
    # the first epoch is done (a short epoch may pass between two polls of the page, so any later one will do)
    expect(status).to_contain_text(re.compile(rf"epoch [2-{EPOCHS - 1}] of {EPOCHS}"), timeout=120_000)
    page.screenshot(path=str(tmp_path / "running_run.png"), full_page=True)
    # the toy model draws its captions in this Python too (a text encoder that failed to load scores about 0)
    before = re.search(r"evaluation before: seen ([0-9.e-]+)", page.locator("#prdp_log textarea").input_value())
    assert before and float(before[1]) > 0.2, page.locator("#prdp_log textarea").input_value()
    page.get_by_role("button", name="stop", exact=True).click()
    expect(message).to_contain_text("Stopping", timeout=30_000)
    expect(status).to_contain_text("stopped", timeout=120_000)
    expect(message).to_have_text("", timeout=30_000)  # "Stopping..." is no longer true
    stopped_at = int(re.search(r"stopped · (\d+) of", status.inner_text())[1])
    assert 1 <= stopped_at < EPOCHS, status.inner_text()
    # the live views were filled while it ran: a curve image and the epoch's samples, with their prompts in full
    curve = page.locator("#prdp_curve img")
    expect(curve).to_have_count(1)
    assert page.locator("#prdp_gallery img").count() >= 2
    expect(page.locator("#prdp_captions li").first).to_contain_text(re.compile(r"images 1–4: .{25,} · rewards"))
    curve_when_stopped = curve.get_attribute("src")

    page.get_by_role("button", name="resume", exact=True).click()
    expect(message).to_contain_text("Resuming", timeout=60_000)
    expect(status).to_contain_text(f"finished · {EPOCHS} of {EPOCHS} epochs", timeout=300_000)
    grid = page.locator("#prdp_before_after img")
    expect(grid).to_have_count(1, timeout=30_000)
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=grid.element_handle(), timeout=30_000)
    shown, natural = grid.evaluate("el => [el.getBoundingClientRect().width, el.naturalWidth]")
    assert shown >= 0.9 * natural, (shown, natural)  # the before/after grid at its own size: its labels read
    expect(curve).not_to_have_attribute("src", curve_when_stopped, timeout=30_000)  # redrawn with the new epochs
    expect(page.locator("#prdp_log textarea")).to_have_value(
        re.compile(f"resumed after epoch {stopped_at}"), timeout=30_000)

    export_message = page.locator("#prdp_export_message").last  # beside the export button
    set_field(page, "export_name", "../escape")
    page.get_by_role("button", name="export", exact=True).click()
    expect(export_message).to_contain_text("Not exported: LoRA name", timeout=60_000)
    expect(export_message.locator(".prdp-error")).to_have_count(1)
    button = page.get_by_role("button", name="export", exact=True).bounding_box()
    assert abs(export_message.bounding_box()["y"] - button["y"]) < 150  # seen where the user clicked
    set_field(page, "export_name", "browser_lora")
    page.get_by_role("button", name="export", exact=True).click()
    expect(export_message).to_contain_text("Saved", timeout=60_000)
    link = page.locator("#prdp_exported a").first
    expect(link).to_be_visible(timeout=30_000)
    # the same name again: refused, the link stays. Gradio 4 drops a click while the previous event of that button
    # has shown its outputs but not yet reported itself complete (trigger_mode "once"), as a quick user's would be.
    for _ in range(5):
        page.get_by_role("button", name="export", exact=True).click()
        try:
            expect(export_message).to_contain_text("already exists", timeout=12_000)
            break
        except AssertionError:
            continue
    expect(export_message).to_contain_text("already exists")
    expect(export_message.locator(".prdp-warning")).to_have_count(1)
    expect(link).to_be_visible()
    page.wait_for_timeout(1500)  # one more poll, so the screenshot shows the final state
    page.screenshot(path=str(tmp_path / "finished_run.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'finished_run.png'}")
    with page.expect_download() as download:  # the file the tab offers is the file it saved
        link.click()
    downloaded = tmp_path / "downloaded.safetensors"
    download.value.save_as(downloaded)
    assert downloaded.read_bytes() == (loras / "browser_lora.safetensors").read_bytes()

    page.reload()  # the reloaded page shows the settings of the run it reports, not the defaults
    if mounted:
        click_tab(page, HOST_TAB)
    expect(page.locator("#prdp_epochs input")).to_have_value(str(EPOCHS), timeout=30_000)
    expect(page.locator("#prdp_num_steps input")).to_have_value("6")

    _assert_loads_in_diffusers(downloaded)
    assert "Traceback" not in log.read_text()


def _assert_loads_in_diffusers(path: Path) -> None:
    from prdp_core.models import load_pipeline

    pipe = load_pipeline("builtin:toy")
    unet = pipe.unet
    latents = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                          generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 8, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        without = unet(latents, 500, text).sample
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        with_lora = unet(latents, 500, text).sample
    assert (with_lora - without).abs().max() > 1e-4  # the trained LoRA is in the file and changes the UNet
