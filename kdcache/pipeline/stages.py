"""Stages that know whether they are up to date.

Every stage owns one folder and writes ``stage.json`` there: its resolved inputs, their hash,
its status (``running`` / ``done``) and its outputs. A stage is skipped when it is ``done``, its
input hash equals the current one and its outputs exist. A stage that is ``running`` with the
same inputs was interrupted: it runs again and resumes itself (training and extraction resume
from their own checkpoints). A stage whose inputs changed starts over in an emptied folder.

Downstream stages put their upstream stages' hashes (or the identity of what those produced) into
their own inputs, so a change anywhere re-runs exactly what depends on it. A stage can also check
that its outputs are still the ones it made (``still_valid``): the store stage notices a store
replaced behind its back and runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def canonical(obj: Any) -> Any:
    """JSON-able, order-independent form of ``obj`` (paths as strings, tuples as lists)."""
    if isinstance(obj, dict):
        return {str(k): canonical(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        # 1 and 1.0 in a YAML file mean the same setting
        return int(obj)
    return obj


def hash_inputs(inputs: dict) -> str:
    text = json.dumps(canonical(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def path_fingerprint(path: str | Path) -> dict:
    """Cheap identity of a user file or folder: names, sizes and modification times.

    LMDB lock files are left out: readers touch them.
    """
    p = Path(path)
    if not p.exists():
        return {"path": str(p), "missing": True}
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    files = []
    for f in sorted(p.rglob("*")):
        if f.is_file() and not f.name.endswith("-lock"):
            st = f.stat()
            files.append([str(f.relative_to(p)), st.st_size, st.st_mtime_ns])
    return {"path": str(p.resolve()), "files": files}


@dataclass
class StageResult:
    name: str
    folder: Path
    input_hash: str
    outputs: dict
    skipped: bool
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def read_stage(folder: Path) -> dict | None:
    f = Path(folder) / "stage.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_stage(folder: Path, record: dict) -> None:
    tmp = folder / "stage.json.tmp"
    tmp.write_text(json.dumps(canonical(record), indent=2))
    os.replace(tmp, folder / "stage.json")  # atomic: a kill never leaves half a stage.json


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def _outputs_exist(folder: Path, outputs: dict) -> bool:
    for v in outputs.values():
        if isinstance(v, str) and v and not (folder / v).exists():
            return False
    return True


def run_stage(
    name: str,
    folder: str | Path,
    inputs: dict,
    fn: Callable[[Path], dict],
    log: Callable[[str], None] = print,
    force: bool = False,
    resumable: bool = True,
    still_valid: Callable[[Path, dict], str | None] | None = None,
) -> StageResult:
    """Run ``fn(folder) -> outputs`` unless the stage is up to date.

    Args:
        name: shown in progress lines, e.g. ``"student n2n"``.
        folder: the stage's own folder (created).
        inputs: everything the stage's result depends on (JSON-able).
        fn: does the work; returns ``{name: path relative to folder, or a JSON value}``.
            Relative path strings among the outputs are checked for existence on later runs.
        log: where progress lines go.
        force: run even when up to date.
        resumable: the work resumes from what an interrupted attempt left in ``folder``
            (training, extraction); if False an interrupted attempt's folder is emptied first.
        still_valid: ``(folder, recorded outputs) -> None``, or why the outputs of an up-to-date
            stage are no longer the ones it made (then the stage runs again in an emptied folder).
    """
    folder = Path(folder)
    h = hash_inputs(inputs)
    prev = read_stage(folder)
    if prev and not force and prev.get("input_hash") == h and prev.get("status") == "done":
        outputs = prev.get("outputs", {})
        if not _outputs_exist(folder, outputs):
            log(f"rerun: {name}: outputs missing in {folder}")
        elif (why := still_valid(folder, outputs) if still_valid else None) is None:
            log(f"skip: {name} up to date ({folder})")
            return StageResult(name, folder, h, outputs, skipped=True, info=prev.get("info", {}))
        else:  # what is there was not made by this stage: nothing in it to resume from
            log(f"rerun: {name}: {why}; clearing {folder}")
            shutil.rmtree(folder, ignore_errors=True)
            prev = None
    if prev and prev.get("input_hash") != h:
        changed = _changed_keys(prev.get("inputs", {}), canonical(inputs))
        log(f"rerun: {name}: inputs changed ({', '.join(changed[:6]) or 'unknown'}); clearing {folder}")
        shutil.rmtree(folder, ignore_errors=True)
    elif prev and prev.get("status") == "running":
        if resumable:
            log(f"resume: {name} (interrupted earlier)")
        else:
            log(f"restart: {name} (interrupted earlier)")
            shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    record = {"stage": name, "status": "running", "input_hash": h, "inputs": inputs,
              "started": started, "outputs": {}}
    _write_stage(folder, record)
    log(f"run: {name} -> {folder}")
    outputs = fn(folder) or {}
    seconds = time.time() - started
    record.update(status="done", outputs=outputs, finished=time.time(), seconds=round(seconds, 3))
    _write_stage(folder, record)
    log(f"done: {name} in {_fmt_seconds(seconds)}")
    return StageResult(name, folder, h, canonical(outputs), skipped=False, seconds=seconds)


def _fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    return f"{int(s // 60)}m{int(s % 60):02d}s"
