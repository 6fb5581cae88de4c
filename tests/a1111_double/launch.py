"""Double of the webui's launch.py (modules/launch_utils.py): what an extension's install.py calls."""

installed = set()  # module / distribution names is_installed answers True for
pip_commands = []


def is_installed(package):
    return package in installed


def run_pip(command, desc=None, live=False):
    pip_commands.append((command, desc))
