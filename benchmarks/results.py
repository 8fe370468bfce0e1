"""Recording benchmark numbers in benchmarks/RESULTS.md, one `## section` per benchmark."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine_name() -> str:
    """e.g. 'x86_64, 2 cores, 23.4 GiB, no GPU' (plus the GPU's name when CUDA is there)."""
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {memory:.1f} GiB, {gpu}"


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replace the section headed `## title` (or append it), stamped with today's date."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    section = f"## {title}\n\n_{datetime.date.today().isoformat()}_\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
