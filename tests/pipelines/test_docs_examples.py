"""The ASE example of docs/recipes.md runs as written (on an untrained tiny student)."""

import re
import warnings
from pathlib import Path

import numpy as np

from kdcache.models.checkpoint import save_checkpoint
from kdcache.models.presets import build_preset

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


def test_ase_md_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    code = next(b for b in blocks if "ase_calculator()" in b and "Langevin" in b)
    ckpt = tmp_path / "student.pt"
    save_checkpoint(ckpt, build_preset("painn-tiny"))
    code = code.replace('"runs/demo/students/v2v/best.pt"', repr(str(ckpt)))
    code = code.replace("steps=50", "steps=2").replace("dyn.run(50)", "dyn.run(3)")
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ASE deprecations of its own API
        exec(compile(code, str(DOC), "exec"), scope)
    atoms = scope["atoms"]
    assert np.isfinite(atoms.get_potential_energy()) and atoms.get_forces().shape == (len(atoms), 3)
