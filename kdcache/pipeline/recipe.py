"""Pipeline recipes: one YAML file describes one teacher -> student configuration end to end.

A recipe is read once, checked completely (every problem is a :class:`ConfigError` that names the
recipe file and the key), and turned into plain dataclasses the runner works from::

    name: demo                      # optional; default: the file name without .yaml
    out: runs/demo                  # optional; default runs/<name>
    device: auto                    # auto | cpu | cuda | cuda:N
    seed: 0                         # teacher, demo data, and students unless `seeds` is given
    seeds: [0, 1, 2]                # optional: every student run is repeated per seed; the report
                                    # gives mean ± sd, and gap closed per seed as mean ± SE
    data:                           # either paths ...
      train: /data/oc20/2M/train    #   (${VAR} and ${VAR:-default} are expanded)
      val: /data/oc20/val_id
      test: /data/oc20/val_id_30k
    # ... or the embedded demo data:  data: {demo: {num_train: 300, num_val: 40, num_test: 40, seed: 0}}
    teacher:
      preset: gemnet-oc             # a kdcache.models.presets name
      overrides: {}                 # constructor arguments changing the preset (not with a checkpoint)
      checkpoint: ckpt.pt           # a trained teacher; or `train:` to train it here
      train: {max_steps: 800, batch_size: 8, lr: 1.0e-3}
    store:
      features: auto                # or a list: node, e2n, e2v, vector, atom_energy, outputs
      dtype: float16
      batch_size: 16
    students:
      preset: painn-small
      train: {max_steps: 600, batch_size: 8}
    strategies:                     # the baseline (no distillation) always runs as well
      - {name: n2n, lambda: 10}
      - {name: e2n, lambda: [0.3, 1, 3]}   # a sweep: λ chosen on the validation split
      - {name: v2v, lambda: 1, loss: mse, train: {lr: 5.0e-4}}
      - {name: n2n+v2v, terms: {n2n: 10, v2v: 1}}
    eval: {batch_size: 16}
    report: {plots: true, cka_samples: 64}

Relative paths are taken from the current working directory. The file is read with
:func:`kdcache.config_yaml.load_yaml` (plain data only; a key given twice is an error).
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.config_yaml import load_yaml
from kdcache.errors import ConfigError

#: distillation strategies known to stage two (``none`` is the baseline).
STRATEGIES = ("n2n", "e2n", "v2v", "vanilla1", "vanilla2")
FEATURE_LOSSES = ("mse", "mae", "huber")
STORE_DTYPES = ("float16", "bfloat16", "float32")
#: what ``kdcache extract --features`` accepts (``outputs`` = teacher energy and forces)
STORE_FEATURES = ("node", "e2n", "e2v", "vector", "atom_energy", "outputs")

#: store entries each strategy reads; v2v depends on the teacher (edge vectors vs PaiNN vectors)
_NEEDS = {
    "n2n": ("node",),
    "e2n": ("e2n",),
    "vanilla1": ("outputs",),
    "vanilla2": ("atom_energy",),
}
#: hidden features each architecture can hand out (registry names)
ARCH_FEATURES = {
    "gemnet_oc": ("node", "e2n", "e2v"),
    "painn": ("node", "vector"),
    "schnet": ("node",),
}

#: trainer settings the pipeline itself sets (from data/store/strategies/out/device)
PIPELINE_OWNED = ("student", "student_overrides", "data", "val", "store", "strategy", "lambda", "lambda_",
                  "feature_loss", "out", "device")

_TOP_KEYS = {"name", "out", "device", "seed", "seeds", "data", "teacher", "store", "students", "strategies", "eval", "report", "description"}


@dataclass
class DataSpec:
    """Where the three splits come from.

    Args:
        train, val, test: dataset paths (None when ``demo`` is set; the runner writes them).
        demo: ``{num_train, num_val, num_test, seed}`` for the embedded demo data, or None.
    """

    train: str | None = None
    val: str | None = None
    test: str | None = None
    demo: dict | None = None


@dataclass
class ModelSpec:
    """A teacher or the student.

    Args:
        preset: a :mod:`kdcache.models.presets` name.
        checkpoint: trained weights (teacher only; its own model configuration wins).
        train: training settings (``kdcache train`` names).
        overrides: constructor arguments that change the preset (e.g. ``max_neighbors: 12``).
    """

    preset: str | None = None
    checkpoint: str | None = None
    train: dict | None = None
    overrides: dict = field(default_factory=dict)


@dataclass
class StoreSpec:
    features: tuple[str, ...] = ()
    dtype: str = "float16"
    batch_size: int = 16
    options: dict = field(default_factory=dict)


@dataclass
class StrategySpec:
    """One distilled student.

    Args:
        name: label of the run (folder name and report row), e.g. ``v2v``.
        terms: strategy -> lambda (one entry for a plain strategy, several for a combination).
        loss: feature loss (mse, mae, huber).
        train: training settings merged over the students' settings.
    """

    name: str
    terms: dict[str, float]
    loss: str = "mse"
    train: dict = field(default_factory=dict)
    #: candidate λ of a sweep (``lambda: [0.3, 1, 3]``; empty: ``terms`` is the one setting)
    sweep: tuple[float, ...] = ()

    @property
    def strategy_string(self) -> str:
        """The ``kdcache train --strategy`` form, e.g. ``n2n:10,v2v:1``."""
        return ",".join(f"{k}:{v:g}" for k, v in self.terms.items())

    def label(self) -> str:
        return " + ".join(f"{k} (λ={v:g})" for k, v in self.terms.items())

    def candidates(self) -> list["StrategySpec"]:
        """One spec per λ of a sweep (named ``<name>_lam<λ>``), or ``[self]``."""
        if not self.sweep:
            return [self]
        (strategy,) = self.terms
        return [StrategySpec(f"{self.name}_lam{lam:g}", {strategy: lam}, self.loss, dict(self.train))
                for lam in self.sweep]


@dataclass
class Recipe:
    path: Path
    name: str
    out: Path
    device: str
    seed: int
    seeds: list[int]
    data: DataSpec
    teacher: ModelSpec
    store: StoreSpec
    student: ModelSpec
    strategies: list[StrategySpec]
    eval: dict
    report: dict
    raw: dict = field(repr=False, default_factory=dict)

    def student_train(self, strategy: StrategySpec | None, seed: int | None = None) -> dict:
        """Training settings of one student run: recipe seed < students.train < strategy.train,
        then the run's own ``seed`` (one of :attr:`seeds`) when given."""
        settings = {"seed": self.seed}
        settings.update(self.student.train or {})
        if strategy is not None:
            settings.update(strategy.train)
        if seed is not None:
            settings["seed"] = seed
        return settings


# --------------------------------------------------------------------------------------------
class _Checker:
    """Collects the recipe path so every error message names file and key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"recipe {self.path}: key {key!r}: {message}")

    def key_in(self, parent: str):
        """``key path -> "recipe <file>: key '<parent>.<key path>'"``, for checks done elsewhere."""
        return lambda k: f"recipe {self.path}: key {(f'{parent}.{k}' if parent else k)!r}"

    def mapping(self, value, key: str, allowed: set[str] | None = None, required=()) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            unknown = sorted(set(value) - allowed)
            if unknown:
                raise self.fail(f"{key}.{unknown[0]}" if key else unknown[0],
                                f"unknown key; allowed: {sorted(allowed)}")
        for r in required:
            if value.get(r) is None:
                raise self.fail(f"{key}.{r}" if key else r, "is required")
        return value

    def typed(self, value, key: str, types, positive: bool = False):
        if float in _as_tuple(types) and isinstance(value, str):
            # PyYAML reads `1e-4` (no dot) as a string; accept what is clearly a number
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) and bool not in _as_tuple(types):
            raise self.fail(key, f"expected {_type_names(types)}, got a boolean")
        if not isinstance(value, types):
            raise self.fail(key, f"expected {_type_names(types)}, got {value!r}")
        if positive and isinstance(value, (int, float)) and not value > 0:
            raise self.fail(key, f"must be > 0, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(key, f"must be finite, got {value!r}")
        return value

    def choice(self, value, key: str, choices):
        if value not in choices:
            raise self.fail(key, f"{value!r} is not one of {list(choices)}")
        return value


def _as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _type_names(types) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str, checker: _Checker, key: str, strict: bool) -> str:
    """Expand ``${VAR}`` / ``${VAR:-default}``; an unset variable without default is an error
    when ``strict`` (running) and left in place otherwise (validating a template)."""

    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default
        if strict:
            raise checker.fail(key, f"environment variable {var} is not set (see docs/recipes.md)")
        return m.group(0)

    return os.path.expanduser(_ENV.sub(sub, value))


def trainer_setting_names() -> set[str] | None:
    """Names ``kdcache train`` accepts (from its config dataclass), or None if not importable."""
    try:
        import dataclasses

        from kdcache.train.config import TrainConfig
    except Exception:  # stage two not installed/importable: only the known keys are checked
        return None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {("lambda" if n == "lambda_" else n) for n in names}


def _check_train(c: _Checker, value, key: str) -> dict:
    """A ``train:`` mapping: names known to stage two and not set by the pipeline; each value's
    type and range by stage two's own rules (one place: :mod:`kdcache.train.config`)."""
    from kdcache.train.config import check_setting

    settings = c.mapping(value, key)
    known = trainer_setting_names()
    out = {}
    for k, v in settings.items():
        if k in PIPELINE_OWNED:
            raise c.fail(f"{key}.{k}", "is set by the pipeline (from data/store/strategies); remove it here")
        if known is not None and k not in known:
            raise c.fail(f"{key}.{k}", f"unknown training setting; known: {', '.join(sorted(known - set(PIPELINE_OWNED)))}")
        out[k] = check_setting(k, v, c.key_in(key))
    return out


def check_with_trainer(c: "_Checker", settings: dict, key: str) -> None:
    """Let stage two's own configuration check the values together (e.g. the strategy)."""
    from kdcache.train.config import TrainConfig

    TrainConfig.from_dict(dict(settings), source=f"recipe {c.path}", where=c.key_in(key))


def _check_model(c: _Checker, value, key: str, strict: bool, need_weights: bool) -> ModelSpec:
    m = c.mapping(value, key, allowed={"preset", "checkpoint", "train", "overrides"})
    preset, ckpt, train = m.get("preset"), m.get("checkpoint"), m.get("train")
    overrides = c.mapping(m.get("overrides"), f"{key}.overrides")
    if overrides and preset is None:
        raise c.fail(f"{key}.overrides", "overrides change a preset; give `preset:` too")
    if overrides and ckpt is not None:
        raise c.fail(f"{key}.overrides", "a checkpoint's own model configuration is used; drop the overrides")
    if preset is not None:
        c.typed(preset, f"{key}.preset", str)
    if ckpt is not None:
        c.typed(ckpt, f"{key}.checkpoint", str)
        ckpt = expand_env(ckpt, c, f"{key}.checkpoint", strict)
    if preset is None and ckpt is None:
        raise c.fail(f"{key}.preset", "give a preset or a checkpoint")
    if train is not None:
        train = _check_train(c, train, f"{key}.train")
    if need_weights and ckpt is None and train is None:
        raise c.fail(key, "give `checkpoint:` (a trained teacher) or `train:` (train it in this pipeline)")
    if need_weights and ckpt is not None and train is not None:
        raise c.fail(f"{key}.train", "a teacher with a checkpoint is not trained again; drop one of the two")
    return ModelSpec(preset=preset, checkpoint=ckpt, train=train, overrides=dict(overrides))


def _check_strategy(c: _Checker, value, key: str) -> StrategySpec:
    if isinstance(value, str):
        value = {"name": value}
    s = c.mapping(value, key, allowed={"name", "strategy", "lambda", "terms", "loss", "train"}, required=("name",))
    sweep: tuple[float, ...] = ()
    if isinstance(s.get("lambda"), list):
        if "terms" in s:
            raise c.fail(f"{key}.lambda", "give either `terms` or `strategy`/`lambda`, not both")
        lams = [c.typed(v, f"{key}.lambda[{i}]", (int, float)) for i, v in enumerate(s["lambda"])]
        if not lams:
            raise c.fail(f"{key}.lambda", "is an empty list")
        for i, v in enumerate(lams):
            if v < 0:
                raise c.fail(f"{key}.lambda[{i}]", f"lambda must be >= 0, got {v}")
        if len(set(lams)) != len(lams):
            raise c.fail(f"{key}.lambda", f"a value is given twice: {lams}")
        sweep = tuple(float(v) for v in lams) if len(lams) > 1 else ()
        s = {**s, "lambda": lams[0]}
    name = c.typed(s["name"], f"{key}.name", str)
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in {"baseline", "teacher", "none"}:
        raise c.fail(f"{key}.name", f"{name!r} cannot name a run (letters, digits, _ . + - only; not baseline/teacher/none)")
    if "terms" in s:
        if "lambda" in s or "strategy" in s:
            raise c.fail(f"{key}.terms", "give either `terms` or `strategy`/`lambda`, not both")
        terms = c.mapping(s["terms"], f"{key}.terms")
        if not terms:
            raise c.fail(f"{key}.terms", "is empty")
    else:
        strategy = s.get("strategy", name)
        c.typed(strategy, f"{key}.strategy", str)
        if s.get("lambda") is None:
            from kdcache.train.strategies import STRATEGIES as _TABLE  # the one table of defaults

            terms = {strategy: _TABLE[strategy].default_lambda if strategy in _TABLE else 1.0}
        else:
            terms = {strategy: s["lambda"]}
    out_terms = {}
    for strat, lam in terms.items():
        tkey = f"{key}.terms.{strat}" if "terms" in s else f"{key}.lambda"
        if strat not in STRATEGIES:
            skey = f"{key}.terms.{strat}" if "terms" in s else (f"{key}.strategy" if "strategy" in s else f"{key}.name")
            raise c.fail(skey, f"unknown strategy {strat!r}; known: {list(STRATEGIES)}")
        lam = c.typed(lam, tkey, (int, float))
        if lam < 0:
            raise c.fail(tkey, f"lambda must be >= 0, got {lam}")
        out_terms[strat] = float(lam)
    loss = c.choice(s.get("loss", "mse"), f"{key}.loss", FEATURE_LOSSES)
    train = _check_train(c, s.get("train"), f"{key}.train") if s.get("train") is not None else {}
    return StrategySpec(name=name, terms=out_terms, loss=loss, train=train, sweep=sweep)


def strategy_needs(strategy: str, teacher_arch: str | None) -> tuple[str, ...]:
    """Store entries (``--features`` names) a strategy reads, given the teacher architecture."""
    if strategy == "v2v":
        return ("vector",) if teacher_arch == "painn" else ("e2v",)
    return _NEEDS[strategy]


def parse_recipe(raw: dict, path: str | Path, strict: bool = True) -> Recipe:
    """Check a recipe mapping and resolve defaults.

    Args:
        raw: the parsed YAML.
        path: the recipe file (named in every error).
        strict: expand environment variables and fail on unset ones (False: keep ``${VAR}``
            placeholders, for validating templates).
    """
    from kdcache.pipeline.backends import check_extract_options  # imports torch: only when checking

    path = Path(path)
    c = _Checker(path)
    r = c.mapping(raw, "", allowed=_TOP_KEYS, required=("data", "teacher", "students"))
    name = r.get("name") or path.name.removesuffix(".yaml").removesuffix(".yml")
    c.typed(name, "name", str)
    out = r.get("out") or f"runs/{name}"
    c.typed(out, "out", str)
    device = c.typed(r.get("device", "auto"), "device", str)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise c.fail("device", f"{device!r} is not auto, cpu, cuda or cuda:N")
    seed = c.typed(r.get("seed", 0), "seed", int)
    seeds = r.get("seeds", [seed])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds:
        raise c.fail("seeds", f"expected a non-empty list of seeds, got {seeds!r}")
    for i, v in enumerate(seeds):
        c.typed(v, f"seeds[{i}]", int)
        if v < 0:
            raise c.fail(f"seeds[{i}]", f"must be >= 0, got {v}")
    if len(set(seeds)) != len(seeds):
        raise c.fail("seeds", f"a seed is given twice: {seeds}")

    # data
    d = c.mapping(r["data"], "data", allowed={"train", "val", "test", "demo"})
    if d.get("demo") is not None:
        if any(d.get(k) for k in ("train", "val", "test")):
            raise c.fail("data.demo", "give either `demo` or train/val/test paths, not both")
        demo = c.mapping(d["demo"], "data.demo", allowed={"num_train", "num_val", "num_test", "seed"})
        demo = {"num_train": 200, "num_val": 40, "num_test": 40, "seed": 0, **demo}
        for k in ("num_train", "num_val", "num_test"):
            c.typed(demo[k], f"data.demo.{k}", int, positive=True)
        c.typed(demo["seed"], "data.demo.seed", int)
        data = DataSpec(demo=demo)
    else:
        paths = {}
        for k in ("train", "val", "test"):
            if d.get(k) is None:
                raise c.fail(f"data.{k}", "is required (or use `data: {demo: {...}}`)")
            paths[k] = expand_env(c.typed(d[k], f"data.{k}", str), c, f"data.{k}", strict)
        data = DataSpec(**paths)

    teacher = _check_model(c, r["teacher"], "teacher", strict, need_weights=True)
    student = _check_model(c, r["students"], "students", strict, need_weights=False)
    if student.checkpoint is not None:
        raise c.fail("students.checkpoint", "students are trained by the pipeline; give a preset")
    if student.train is None:
        student.train = {}

    strategies_raw = r.get("strategies") or []
    if not isinstance(strategies_raw, list):
        raise c.fail("strategies", "expected a list")
    strategies = [_check_strategy(c, s, f"strategies[{i}]") for i, s in enumerate(strategies_raw)]
    names = [s.name for s in strategies] + [c_.name for s in strategies if s.sweep for c_ in s.candidates()]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise c.fail("strategies", f"run names must be unique; repeated: {sorted(dup)}")

    st = c.mapping(r.get("store"), "store", allowed={"features", "dtype", "batch_size", "options"})
    feats = st.get("features", "auto")
    if feats == "auto" or feats is None:
        feats = ()  # resolved by the runner from the strategies and the teacher's architecture
    else:
        if isinstance(feats, str):
            feats = [f.strip() for f in feats.split(",") if f.strip()]
        if not isinstance(feats, list):
            raise c.fail("store.features", "expected `auto` or a list")
        for f in feats:
            c.choice(f, "store.features", STORE_FEATURES)
        feats = tuple(feats)
    store = StoreSpec(
        features=feats,
        dtype=c.choice(st.get("dtype", "float16"), "store.dtype", STORE_DTYPES),
        batch_size=c.typed(st.get("batch_size", 16), "store.batch_size", int, positive=True),
        options=check_extract_options(c.mapping(st.get("options"), "store.options"), c.key_in("store.options")),
    )

    ev = c.mapping(r.get("eval"), "eval", allowed={"batch_size"})
    ev = {"batch_size": 16, **ev}
    c.typed(ev["batch_size"], "eval.batch_size", int, positive=True)
    rep = c.mapping(r.get("report"), "report", allowed={"plots", "cka_samples", "parity_samples", "title"})
    rep = {"plots": True, "cka_samples": 64, "parity_samples": 200, "title": None, **rep}
    c.typed(rep["plots"], "report.plots", bool)
    c.typed(rep["cka_samples"], "report.cka_samples", int, positive=True)
    c.typed(rep["parity_samples"], "report.parity_samples", int, positive=True)

    if teacher.train is not None:
        check_with_trainer(c, {"student": teacher.preset, **teacher.train}, "teacher.train")
    check_with_trainer(c, {"student": student.preset, **student.train}, "students.train")
    for i, s in enumerate(strategies):
        merged = {"student": student.preset, **student.train, **s.train, "strategy": s.strategy_string, "feature_loss": s.loss}
        check_with_trainer(c, merged, f"strategies[{i}]")

    return Recipe(
        path=path, name=name, out=Path(out), device=device, seed=seed, seeds=list(seeds), data=data, teacher=teacher,
        store=store, student=student, strategies=strategies, eval=ev, report=rep, raw=copy.deepcopy(raw),
    )


def load_recipe(path: str | Path, strict: bool = True) -> Recipe:
    """Read and check a recipe file (see the module docstring for the format).

    Raises:
        ConfigError: no such file, invalid YAML, a key given twice, or a value the schema refuses.
    """
    path = Path(path)
    raw = load_yaml(path, what="recipe")
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top level")
    return parse_recipe(raw, path, strict=strict)
