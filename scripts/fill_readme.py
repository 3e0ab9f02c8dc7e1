"""Refresh the generated parts of README.md (between `<!-- NAME:begin -->` / `<!-- NAME:end -->` markers)
from results/: the compression table and the learning-rate study's report."""
import re
import subprocess
import sys
from pathlib import Path

readme = Path("README.md")


def fill(text: str, name: str, body: str) -> str:
    block = f"<!-- {name}:begin -->\n{body.strip()}\n<!-- {name}:end -->"
    return re.sub(rf"<!-- {name}:begin -->.*?<!-- {name}:end -->", lambda _: block, text, flags=re.S)


text = readme.read_text()
table = subprocess.run([sys.executable, "scripts/render_compression_table.py"], capture_output=True, text=True,
                       check=True).stdout
text = fill(text, "compression-table", table)
study = Path("results/lr-study-quick")
if (study / "report.md").is_file():
    text = fill(text, "lr-study", (study / "report.md").read_text()
                + f"\n![learning-rate sweep]({study}/lr_sweep.png)\n\n![training curves]({study}/curves.png)\n")
readme.write_text(text)
