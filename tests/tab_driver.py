"""Serving the PRDP tab and driving it in a browser page: shared by the browser tests (standalone, mounted in a
host's Blocks, inside a real webui)."""

import socket
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, server, log, seconds: float, what: str) -> None:
    """Wait until `url` answers; fail with the server's log if the process `server` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert server.poll() is None, f"{what} exited:\n{log.read_text()}"
            time.sleep(0.5)
    pytest.fail(f"{what} did not answer in {seconds:.0f} s:\n{log.read_text()}")


def set_field(page, name: str, value) -> None:
    field = page.locator(f"#prdp_{name} :is(input, textarea)")
    field.fill(str(value))
    field.press("Tab")  # Gradio takes a number on change/blur


def fill_short_toy_run(page, epochs: int) -> None:
    """The form's settings for a toy run of a few seconds per epoch, evaluation included."""
    for name, value in [("epochs", epochs), ("prompts_per_epoch", 2), ("images_per_prompt", 4), ("num_steps", 6)]:
        set_field(page, name, value)
    set_field(page, "eval_max_prompts", 2)
    set_field(page, "eval_images_per_prompt", 2)


def click_tab(page, name: str) -> None:
    """A tab of the page's Blocks: a "tab" role from Gradio 4 on, a plain button in Gradio 3."""
    page.get_by_role("tab", name=name).or_(page.get_by_role("button", name=name, exact=True)).first.click()


def start_short_toy_run(page, epochs: int):
    """From the tab with no run yet: fill the form for a short toy run and start it. Returns the (status, message)
    locators (.last: Gradio 3 repeats a Markdown's elem_id on its wrapper)."""
    from playwright.sync_api import expect

    status, message = page.locator("#prdp_status").last, page.locator("#prdp_message").last
    expect(status).to_contain_text("No run yet", timeout=60_000)
    fill_short_toy_run(page, epochs)
    page.get_by_role("button", name="start", exact=True).click()
    expect(message).to_contain_text("Started", timeout=60_000)
    return status, message
