"""Refresh the generated parts of README.md (between the table markers) from results/."""
import re
import subprocess
import sys
from pathlib import Path

readme = Path("README.md")
table = subprocess.run([sys.executable, "scripts/render_compression_table.py"], capture_output=True, text=True,
                       check=True).stdout.strip()
text = readme.read_text()
block = f"<!-- compression-table:begin -->\n{table}\n<!-- compression-table:end -->"
if "TABLE_PLACEHOLDER" in text:
    text = text.replace("TABLE_PLACEHOLDER", block)
else:
    text = re.sub(r"<!-- compression-table:begin -->.*?<!-- compression-table:end -->", block, text, flags=re.S)
readme.write_text(text)
