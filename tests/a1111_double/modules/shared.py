"""Double of modules/shared.py and options.py: the command-line options and the settings store."""

from types import SimpleNamespace

cmd_opts = SimpleNamespace(lora_dir=None, ckpt_dir=None)  # the Lora extension's preload adds --lora-dir


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section, self.comment_after = section, comment_after

    def needs_reload_ui(self):
        self.comment_after += " (requires Reload UI)"
        return self


class Options:
    def __init__(self):
        object.__setattr__(self, "data_labels", {})
        object.__setattr__(self, "data", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        if key in self.data_labels:
            return self.data_labels[key].default
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value


opts = Options()
