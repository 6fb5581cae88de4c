"""The docs stay true: the settings page is what the config says, and every link leads to a file in the repository."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_the_settings_page_is_current():
    page = subprocess.run([sys.executable, str(ROOT / "tools" / "config_doc.py")], capture_output=True, text=True,
                          check=True).stdout
    assert page == (ROOT / "docs" / "config.md").read_text(encoding="utf-8"), \
        "docs/config.md is out of date: run python tools/config_doc.py > docs/config.md"


def test_every_link_stays_in_the_repository():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            path = (page.parent / target.split("#")[0]).resolve()
            if "://" in target or not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
