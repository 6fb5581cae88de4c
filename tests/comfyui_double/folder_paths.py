"""Test double of ComfyUI's folder_paths: named model folders under a base folder, and the output folder.

Like ComfyUI, a folder type maps to a list of folders (the first is where files are written) and listing returns
paths relative to their folder, sorted, filtered by extension."""

import os

SUPPORTED_PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}
output_directory = ""


def set_base_path(base: str) -> None:
    """What ComfyUI's --base-directory does: models/<type> and output/ under `base`."""
    global output_directory
    models = os.path.join(base, "models")
    for name in ("checkpoints", "loras", "vae"):
        folder_names_and_paths[name] = ([os.path.join(models, name)], SUPPORTED_PT_EXTENSIONS)
    output_directory = os.path.join(base, "output")


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name: str) -> list[str]:
    folders, extensions = folder_names_and_paths[folder_name]
    found = set()
    for folder in folders:
        for root, _, files in os.walk(folder):
            found.update(os.path.relpath(os.path.join(root, f), folder) for f in files
                         if os.path.splitext(f)[1].lower() in extensions)
    return sorted(found)


def get_full_path(folder_name: str, filename: str) -> str | None:
    filename = os.path.relpath(os.path.join("/", filename), "/")  # as ComfyUI: no escaping the folder
    for folder in folder_names_and_paths.get(folder_name, ([], set()))[0]:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    return None


def get_output_directory() -> str:
    return output_directory
