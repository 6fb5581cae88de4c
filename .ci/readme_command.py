"""Prints one of the README's two commands: `main` (set up and train) or `test` (set up and run the tests).
.ci/run runs the test command printed here, so CI runs the README's command by construction."""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(encoding="utf-8"), re.S)
print(blocks[{"main": 0, "test": 1}[sys.argv[1]]].strip())
