"""capsmed.report knows no torch: importing and using it must not load torch or MONAI."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_does_not_load_torch_or_monai(repo_root):
    code = textwrap.dedent("""
        import sys
        import capsmed.report
        import capsmed.report.figures, capsmed.report.stats, capsmed.report.qc
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("torch", "monai", "sklearn", "torchvision"))
        capsmed_mods = sorted(m for m in sys.modules if m.startswith("capsmed."))
        print("HEAVY", heavy)
        print("CAPSMED", capsmed_mods)
        print("PYPLOT", "matplotlib.pyplot" in sys.modules)
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True,
                         text=True, timeout=60, check=True)
    out = res.stdout
    assert "HEAVY []" in out, out
    assert "PYPLOT False" in out, out
    # capsmed.measures: numpy only, the one home of the confidence bins and entropy;
    # capsmed.data.labels: torch-free label names (capsmed.data imports its modules lazily)
    allowed = ("capsmed.report", "capsmed.errors", "capsmed.paths", "capsmed.fileio",
               "capsmed.measures", "capsmed.data.labels")
    mods = eval(out.split("CAPSMED ", 1)[1].splitlines()[0])  # noqa: S307 - our own output
    assert all(m.startswith(allowed) or m == "capsmed.data" for m in mods), mods
