"""Double of modules/script_callbacks.py: the registration hooks the extension uses, and the webui's calls."""

callbacks_ui_tabs, callbacks_ui_settings, callbacks_app_started = [], [], []


def on_ui_tabs(callback, *, name=None):
    callbacks_ui_tabs.append(callback)


def on_ui_settings(callback, *, name=None):
    callbacks_ui_settings.append(callback)


def on_app_started(callback, *, name=None):
    callbacks_app_started.append(callback)


def app_started_callback(demo, app):
    for callback in callbacks_app_started:
        callback(demo, app)


def ui_tabs_callback():
    """What the webui does while building its UI: every callback's [(blocks, title, elem_id)] in one list."""
    return [tab for callback in callbacks_ui_tabs for tab in callback() or []]


def ui_settings_callback():
    for callback in callbacks_ui_settings:
        callback()


def clear_callbacks():
    callbacks_ui_tabs.clear()
    callbacks_ui_settings.clear()
    callbacks_app_started.clear()
