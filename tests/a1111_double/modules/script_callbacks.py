"""Double of modules/script_callbacks.py: the two registration hooks the extension uses, and the webui's calls."""

callbacks_ui_tabs, callbacks_ui_settings = [], []


def on_ui_tabs(callback, *, name=None):
    callbacks_ui_tabs.append(callback)


def on_ui_settings(callback, *, name=None):
    callbacks_ui_settings.append(callback)


def ui_tabs_callback():
    """What the webui does while building its UI: every callback's [(blocks, title, elem_id)] in one list."""
    return [tab for callback in callbacks_ui_tabs for tab in callback() or []]


def ui_settings_callback():
    for callback in callbacks_ui_settings:
        callback()


def clear_callbacks():
    callbacks_ui_tabs.clear()
    callbacks_ui_settings.clear()
