"""Rewrite the config key table in README.md from `fedit keys --markdown`."""

import re
import subprocess
import sys
from pathlib import Path

readme = Path(__file__).resolve().parents[1] / "README.md"
table = subprocess.run(
    [sys.executable, "-m", "fedit.cli", "keys", "--markdown"],
    check=True,
    capture_output=True,
    text=True,
).stdout.strip()
text = readme.read_text(encoding="utf-8")
new = re.sub(
    r"(<!-- keys:start -->\n).*?(\n<!-- keys:end -->)",
    lambda m: m.group(1) + table + m.group(2),
    text,
    flags=re.S,
)
readme.write_text(new, encoding="utf-8")
print("README key table updated" if new != text else "README key table already current")
