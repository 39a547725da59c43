"""Pipeline recipes: one YAML file describes one teacher -> student configuration end to end.

A recipe is read once and checked completely against one schema (:class:`RecipeFile`, pydantic
models per section; every problem is a :class:`ConfigError` that names the recipe file and the key
path). Its ``train:`` sections are stage two's own settings schema
(:class:`kdcache.train.config.TrainConfig`), its strategies those of
:data:`kdcache.train.strategies.STRATEGIES`, its ``store.options`` those of ``kdcache extract``::

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
    #   sample: {seeds: train, per_seed: 10, rattle: 0.05, strain: 0.0, min_distance: 0.5, seed: 0}
    #                             # optional: `kdcache data sample` candidates of the training
    #                             # split, or of `pool` (unlabelled structures: `data.pool: PATH`,
    #                             # or the demo's `num_pool: N`), with no labels, labelled once by
    #                             # the teacher (runs with `data: sampled` train on them)
    teacher:
      preset: gemnet-oc             # a kdcache.models.presets name
      overrides: {}                 # constructor arguments changing the preset (not with a checkpoint)
      checkpoint: ckpt.pt           # a trained teacher; or `train:` to train it here
      train: {max_steps: 800, batch_size: 8, lr: 1.0e-3}
    # teacher: {calculator: emt}    # or a calculator of the fixed table CALCULATORS (no code named)
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
      - {name: sampled, strategy: none, data: sampled, train: {labels: teacher}}
    eval: {batch_size: 16}
    report: {plots: true, cka_samples: 64}   # compare_to: RUN adds gap closed against that run

Relative paths are taken from the current working directory. The file is read with
:func:`kdcache.config_yaml.load_yaml` (plain data only; a key given twice is an error).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, PlainValidator, ValidationInfo, field_validator, model_validator

from kdcache.config_yaml import load_yaml
from kdcache.data.candidates import CandidateSettings
from kdcache.errors import ConfigError
from kdcache.settings import (ANY_MAPPING, Schema, choice, integer, number, one_or_list, refuse, section_dict,
                              switch_or_auto, text_list, validated)
from kdcache.store.format import FEATURE_CHOICES, FEATURE_DTYPES
from kdcache.teachers.adapter import is_adapter_spec
from kdcache.teachers.calculator import CalculatorSpec, is_calculator_spec
from kdcache.train.config import TrainConfig
from kdcache.train.strategies import FEATURE_LOSSES, STRATEGIES

#: trainer settings the pipeline itself sets (from data/store/strategies/out/device)
PIPELINE_OWNED = ("student", "student_overrides", "data", "val", "store", "strategy", "lambda", "lambda_",
                  "feature_loss", "out", "device")

#: the ASE calculators a recipe may name as its teacher (``teacher: {calculator: emt}``). A fixed
#: table that kdcache ships: a recipe is a file that users run without reading it as code, so it
#: names one of these, never a module to import (``ase:MODULE:FACTORY`` is for the command line;
#: see :mod:`kdcache.teachers.calculator`)
CALCULATORS: dict[str, CalculatorSpec] = {
    "emt": CalculatorSpec("ase.calculators.emt", "EMT"),
    "gfn2-xtb": CalculatorSpec("tblite.ase", "TBLite", {"method": "GFN2-xTB", "verbosity": 0}),
}
#: what a run trains on: the training split, or the candidates of ``data.sample``
DATA_SOURCES = ("train", "sampled")

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str, strict: bool) -> str:
    """Expand ``${VAR}`` / ``${VAR:-default}`` and ``~``.

    Args:
        value: a path as written.
        strict: an unset variable without default is an error (running); False leaves it in
            place (validating a template).

    Raises:
        PydanticCustomError: (strict) naming the unset variable; raised while a schema validates.
    """

    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default
        if strict:
            raise refuse("", f"environment variable {var} is not set (see docs/recipes.md)")
        return m.group(0)

    return os.path.expanduser(_ENV.sub(sub, value))


def _expanded(value: str, info: ValidationInfo) -> str:
    return expand_env(value, (info.context or {}).get("strict", True))


#: a file path of the recipe, with environment variables expanded
EnvPath = Annotated[str, AfterValidator(_expanded)]


def _train_section(value: Any) -> dict:
    """A ``train:`` mapping: stage two's own settings (each value checked by
    :class:`~kdcache.train.config.TrainConfig`'s field), none of those the pipeline sets."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise refuse("", f"expected a mapping, got {type(value).__name__}")
    known = [k for k in TrainConfig.setting_keys() if k not in PIPELINE_OWNED]
    for key in value:
        if key in PIPELINE_OWNED:
            raise refuse(str(key), "is set by the pipeline (from data/store/strategies); remove it here")
        if key not in known:
            raise refuse(str(key), f"unknown training setting; known: {', '.join(sorted(known))}")
    checked = TrainConfig.model_validate(value)
    return {k: getattr(checked, k) for k in value}


#: the settings of ``kdcache train`` that a recipe may give (the train settings schema)
TrainSection = Annotated[dict, PlainValidator(_train_section)]


class DemoData(Schema):
    """``data: {demo: ...}``: the embedded demo data (:mod:`kdcache.data.demo`)."""

    num_train: integer(gt=0) = 200
    num_val: integer(gt=0) = 40
    num_test: integer(gt=0) = 40
    #: unlabelled structures of other systems (``pool``: seeds for ``data.sample``); 0: none
    num_pool: integer(ge=0) = 0
    seed: integer() = 0


_CANDIDATE = CandidateSettings()


#: where ``data.sample`` takes its seed structures: the training split, or the unlabelled pool
SAMPLE_SEEDS = ("train", "pool")


class SampleData(Schema):
    """``data: {sample: ...}``: candidate structures drawn from seed structures by
    :func:`kdcache.data.candidates.write_candidates` (``kdcache data sample``; each key but
    ``seeds`` is its option of the same name, with its default and its rules).

    Args:
        seeds: ``train`` (the training split's structures, their labels ignored) or ``pool``
            (``data.pool``, or the demo's ``num_pool`` unlabelled structures of other systems).
    """

    seeds: choice(SAMPLE_SEEDS) = "train"
    per_seed: integer(gt=0) = _CANDIDATE.per_seed
    rattle: number(ge=0) = _CANDIDATE.rattle
    strain: number(ge=0) = _CANDIDATE.strain
    min_distance: number(ge=0) = _CANDIDATE.min_distance
    attempts: integer(gt=0) = _CANDIDATE.attempts
    seed: integer(ge=0) = _CANDIDATE.seed

    @model_validator(mode="after")
    def _candidates_rules(self) -> "SampleData":
        try:
            CandidateSettings(**self.model_dump(exclude={"seeds"})).check()
        except ConfigError as exc:  # it names command-line options: `--min-distance` is `min_distance` here
            raise refuse("", re.sub(r"--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), str(exc))) from None
        return self


class DataSpec(Schema):
    """Where the three splits come from.

    Args:
        train, val, test: dataset paths (None when ``demo`` is set; the runner writes them).
        demo: ``{num_train, num_val, num_test, num_pool, seed}`` for the embedded demo data, or None.
        pool: structures without labels (any format kdcache reads), seeds for ``sample: {seeds:
            pool}``; with ``demo``, its ``num_pool`` instead.
        sample: candidates drawn from the training split or the pool (:class:`SampleData`
            settings), or None.
    """

    train: EnvPath | None = None
    val: EnvPath | None = None
    test: EnvPath | None = None
    pool: EnvPath | None = None
    demo: section_dict(DemoData) | None = None
    sample: section_dict(SampleData) | None = None

    def has_pool(self) -> bool:
        return self.pool is not None or (self.demo is not None and self.demo["num_pool"] > 0)

    @model_validator(mode="after")
    def _pool_for_sampling(self) -> "DataSpec":
        if self.sample is not None and self.sample["seeds"] == "pool" and not self.has_pool():
            raise refuse("sample.seeds", "`pool` needs unlabelled structures: give `data.pool: PATH` "
                                         "(or `demo: {num_pool: N}`)")
        return self

    @model_validator(mode="after")
    def _paths_or_demo(self) -> "DataSpec":
        if self.demo is not None:
            if any((self.train, self.val, self.test, self.pool)):
                key = next(k for k in ("train", "val", "test", "pool") if getattr(self, k))
                raise refuse(key, "give either `demo` or data paths, not both")
            return self
        for k in ("train", "val", "test"):
            if getattr(self, k) is None:
                raise refuse(k, "is required (or use `data: {demo: {...}}`)")
        return self


class ModelSpec(Schema):
    """A teacher or the students.

    Args:
        preset: a :mod:`kdcache.models.presets` name.
        checkpoint: trained weights (teacher only; its own model configuration wins).
        train: training settings (``kdcache train`` names).
        overrides: constructor arguments that change the preset (e.g. ``max_neighbors: 12``).
    """

    preset: str | None = None
    checkpoint: EnvPath | None = None
    train: TrainSection | None = None
    overrides: ANY_MAPPING = Field(default_factory=dict)

    @field_validator("preset")
    @classmethod
    def _no_code(cls, preset: str | None) -> str | None:
        if is_calculator_spec(preset):
            raise refuse("", f"{preset!r}: a recipe names no module to import; a calculator teacher is "
                             f"`teacher: {{calculator: NAME}}` with NAME one of {list(CALCULATORS)}")
        if is_adapter_spec(preset):
            raise refuse("", f"{preset!r}: a recipe names no module to import; extract an adapter teacher with "
                             "`kdcache extract --teacher py:...` and train students on that store by hand")
        return preset

    @model_validator(mode="after")
    def _preset_or_checkpoint(self) -> "ModelSpec":
        if self.overrides and self.preset is None:
            raise refuse("overrides", "overrides change a preset; give `preset:` too")
        if self.overrides and self.checkpoint is not None:
            raise refuse("overrides", "a checkpoint's own model configuration is used; drop the overrides")
        if self.preset is None and self.checkpoint is None:
            raise refuse("preset", "give a preset or a checkpoint")
        return self


class TeacherSpec(ModelSpec):
    """The teacher: trained weights (``checkpoint``) or trained here (``train``), not both; or an
    ASE calculator of :data:`CALCULATORS` (``calculator``), alone.

    Args:
        calculator: a name of :data:`CALCULATORS`, or None (a model teacher).
    """

    calculator: choice(tuple(CALCULATORS)) | None = None

    @model_validator(mode="after")
    def _preset_or_checkpoint(self) -> "TeacherSpec":
        # (replaces the model checks: a calculator teacher has no preset)
        if self.calculator is not None:
            given = [k for k in ("preset", "checkpoint", "train") if getattr(self, k) is not None]
            given += ["overrides"] if self.overrides else []
            if given:
                raise refuse(given[0], f"a calculator teacher ({self.calculator}) is not a model; drop `{given[0]}`")
            return self
        super()._preset_or_checkpoint()
        if self.checkpoint is None and self.train is None:
            raise refuse("", "give `checkpoint:` (a trained teacher), `train:` (train it in this pipeline) "
                             f"or `calculator:` (one of {list(CALCULATORS)})")
        if self.checkpoint is not None and self.train is not None:
            raise refuse("train", "a teacher with a checkpoint is not trained again; drop one of the two")
        return self

    @property
    def calculator_spec(self) -> CalculatorSpec | None:
        """The calculator this teacher names (None: a model teacher)."""
        return None if self.calculator is None else CALCULATORS[self.calculator]

    def describe(self) -> str:
        """How logs and the report name the teacher."""
        if self.calculator is not None:
            return f"calculator {self.calculator} ({self.calculator_spec.name})"
        return str(self.preset or self.checkpoint)


class StudentSpec(ModelSpec):
    """The students: a preset the pipeline trains (``train``: the settings every run shares)."""

    train: TrainSection = Field(default_factory=dict)

    @model_validator(mode="after")
    def _no_checkpoint(self) -> "StudentSpec":
        if self.checkpoint is not None:
            raise refuse("checkpoint", "students are trained by the pipeline; give a preset")
        return self


class StoreSpec(Schema):
    """How the teacher's store is extracted.

    Args:
        features: ``--features`` names; empty for ``auto`` (every target the teacher can give).
        dtype: feature dtype. batch_size: extraction batch size.
        options: further ``kdcache extract`` settings (its own names and rules).
    """

    features: Annotated[text_list(choice(FEATURE_CHOICES)), AfterValidator(tuple)] = ()
    dtype: choice(FEATURE_DTYPES) = "float16"
    batch_size: integer(gt=0) = 16
    options: ANY_MAPPING = Field(default_factory=dict)

    @field_validator("features", mode="before")
    @classmethod
    def _auto(cls, value: Any) -> Any:
        return [] if value in ("auto", None) else value  # resolved by the runner (resolve_store_features)

    @field_validator("options")
    @classmethod
    def _extract_settings(cls, options: dict, info: ValidationInfo) -> dict:
        from kdcache.pipeline.backends import check_extract_options  # imports torch: only when checking

        source = (info.context or {}).get("source", "recipe")
        return check_extract_options(options, lambda k: f"{source}: key {'store.options.' + k!r}")


_LAMBDA = number(ge=0)


class StrategyEntry(Schema):
    """One entry of ``strategies:`` (a name alone, or a mapping; see the module docstring).

    ``strategy: none`` is a student without distillation terms that differs from the baseline by
    its data (``data: sampled``), its labels (``train: {labels: teacher}``) or its settings.
    """

    name: str
    strategy: str | None = None
    lambda_: one_or_list(_LAMBDA) | None = Field(None, alias="lambda")
    terms: dict[str, _LAMBDA] | None = None
    loss: choice(FEATURE_LOSSES) = "mse"
    data: choice(DATA_SOURCES) = "train"
    train: TrainSection = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> "StrategyEntry":
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name) or self.name in {"baseline", "teacher", "none"}:
            raise refuse("name", f"{self.name!r} cannot name a run (letters, digits, _ . + - only; "
                                 "not baseline/teacher/none)")
        lams = self.lambda_ or []
        if self.lambda_ == []:
            raise refuse("lambda", "is an empty list")
        if len(set(lams)) != len(lams):
            raise refuse("lambda", f"a value is given twice: {lams}")
        if self.terms is not None:
            if self.lambda_ is not None or self.strategy is not None:
                raise refuse("terms", "give either `terms` or `strategy`/`lambda`, not both")
            if not self.terms:
                raise refuse("terms", "is empty")
        if self.strategy == "none" and self.lambda_ is not None:
            raise refuse("lambda", "strategy none has no λ")
        for strategy, key in self._named():
            if strategy not in STRATEGIES and not (strategy == "none" and key == "strategy"):
                raise refuse(key, f"unknown strategy {strategy!r}; known: {['none', *STRATEGIES]}")
        return self

    def _named(self) -> list[tuple[str, str]]:
        """(strategy, the key that names it)."""
        if self.terms is not None:
            return [(k, f"terms.{k}") for k in self.terms]
        return [(self.strategy, "strategy")] if self.strategy is not None else [(self.name, "name")]

    def spec(self) -> "StrategySpec":
        """The run this entry describes (λ: given, else the strategy's own default)."""
        if self.terms is not None:
            return StrategySpec(self.name, dict(self.terms), self.loss, self.train, data=self.data)
        ((strategy, _),) = self._named()
        if strategy == "none":
            return StrategySpec(self.name, {}, self.loss, self.train, data=self.data)
        lams = self.lambda_ or [STRATEGIES[strategy].default_lambda]
        return StrategySpec(self.name, {strategy: lams[0]}, self.loss, self.train,
                            sweep=tuple(lams) if len(lams) > 1 else (), data=self.data)


class EvalSpec(Schema):
    """``eval:``. ``fast``: the compiled path for the evaluations (``kdcache eval --fast``;
    default auto, see :mod:`kdcache.models.fast_auto`)."""

    batch_size: integer(gt=0) = 16
    fast: switch_or_auto() = "auto"


class ReportSpec(Schema):
    """``report:``. ``compare_to``: the name of a strategies entry; the report adds a second
    table, gap closed against that run (of the same seed) instead of the baseline, e.g. a
    distillation term on top of teacher labels against the teacher labels alone."""

    plots: bool = True
    cka_samples: integer(gt=0) = 64
    parity_samples: integer(gt=0) = 200
    title: str | None = None
    compare_to: str | None = None


class RecipeFile(Schema):
    """The schema of a recipe file (the module docstring shows every key)."""

    name: str | None = None
    description: Any = None
    out: str | None = None
    device: str = "auto"
    seed: integer() = 0
    seeds: one_or_list(integer(ge=0)) | None = None
    data: DataSpec
    teacher: TeacherSpec
    students: StudentSpec
    store: StoreSpec = Field(default_factory=StoreSpec)
    strategies: Annotated[list[StrategyEntry], AfterValidator(list)] = Field(default_factory=list)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)

    @field_validator("strategies", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
            raise refuse("", f"{device!r} is not auto, cpu, cuda or cuda:N")
        return device

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and not seeds:
            raise refuse("", f"expected a non-empty list of seeds, got {seeds!r}")
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise refuse("", f"a seed is given twice: {seeds}")
        return seeds

    @model_validator(mode="after")
    def _compared_run(self) -> "RecipeFile":
        name = self.report.compare_to
        names = [s.name for s in self.strategies]
        if name is not None and name not in names:
            raise refuse("report.compare_to", f"{name!r} is not a run of this recipe; its runs: {', '.join(names) or 'none'}")
        if name is not None and len(names) < 2:
            raise refuse("report.compare_to", "needs another run to compare with")
        return self

    @model_validator(mode="after")
    def _sampled_data(self) -> "RecipeFile":
        for i, s in enumerate(self.strategies):
            if s.data != "sampled":
                continue
            if self.data.sample is None:
                raise refuse(f"strategies[{i}].data", "there are no sampled data: add `data: {sample: {...}}`")
            if {**self.students.train, **s.train}.get("labels", "reference") == "reference":
                raise refuse(f"strategies[{i}].data", "the sampled candidates have no reference labels; give "
                                                      "`train: {labels: teacher}`")
        return self

    @model_validator(mode="after")
    def _targets_of_their_own(self) -> "RecipeFile":
        """A strategy whose target is stored by an extraction option of its own (``hessian``:
        ``--hessian-probes K``) needs that option in ``store.options``; K is the user's choice."""
        for i, s in enumerate(self.strategies):
            for strategy, _ in s._named():
                option = getattr(STRATEGIES.get(strategy), "extract_option", None)
                key = option.split()[0].lstrip("-").replace("-", "_") if option else None
                if key and not self.store.options.get(key):
                    raise refuse(f"strategies[{i}]", f"{strategy} reads targets stored by `kdcache extract "
                                                     f"{option}`: give `store: {{options: {{{key}: K}}}}`")
        return self

    @model_validator(mode="after")
    def _unique_runs(self) -> "RecipeFile":
        specs = [s.spec() for s in self.strategies]
        names = [s.name for s in specs] + [c.name for s in specs if s.sweep for c in s.candidates()]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise refuse("strategies", f"run names must be unique; repeated: {sorted(dup)}")
        return self


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
    #: what the run trains on (:data:`DATA_SOURCES`)
    data: str = "train"

    @property
    def strategy_string(self) -> str:
        """The ``kdcache train --strategy`` form, e.g. ``n2n:10,v2v:1`` (``none``: no terms)."""
        return ",".join(f"{k}:{v:g}" for k, v in self.terms.items()) or "none"

    def label(self) -> str:
        """E.g. ``v2v (λ=1)``; ``none, sampled data, teacher labels`` for a run that differs by its data."""
        text = " + ".join(f"{k} (λ={v:g})" for k, v in self.terms.items()) or "none"
        if self.data != "train":
            text += f", {self.data} data"
        labels = self.train.get("labels", "reference")
        return text + (f", {labels} labels" if labels != "reference" else "")

    def candidates(self) -> list["StrategySpec"]:
        """One spec per λ of a sweep (named ``<name>_lam<λ>``), or ``[self]``."""
        if not self.sweep:
            return [self]
        (strategy,) = self.terms
        return [StrategySpec(f"{self.name}_lam{lam:g}", {strategy: lam}, self.loss, dict(self.train), data=self.data)
                for lam in self.sweep]


@dataclass
class Recipe:
    """A checked recipe, defaults resolved (what the runner works from).

    Args:
        path: the recipe file. name: its name (default: the file name). out: the run folder.
        device: ``auto``, ``cpu``, ``cuda[:N]``. seed: the recipe seed. seeds: one run per seed.
        data, teacher, store, student: the sections (``student`` is ``students:``).
        strategies: the distilled runs. eval, report: those sections with defaults filled in.
        raw: the recipe as read (written next to the results).
    """

    path: Path
    name: str
    out: Path
    device: str
    seed: int
    seeds: list[int]
    data: DataSpec
    teacher: TeacherSpec
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

    def labels(self, strategy: StrategySpec | None) -> str:
        """The ``labels`` a run trains on (``reference``, ``teacher``, ``both``)."""
        return self.student_train(strategy).get("labels", "reference")

    def needs_store(self, strategy: StrategySpec | None) -> bool:
        """Whether a run reads the teacher's store (distillation terms or the teacher's labels)."""
        return bool(strategy is not None and strategy.terms) or self.labels(strategy) != "reference"

    def store_sources(self) -> list[str]:
        """The data (:data:`DATA_SOURCES`) whose teacher store some run reads, in that order."""
        runs = [(None, "train")] + [(c, c.data) for s in self.strategies for c in s.candidates()]
        used = {source for spec, source in runs if self.needs_store(spec)}
        return [s for s in DATA_SOURCES if s in used]


def _check_runs_together(recipe: Recipe, where) -> None:
    """Let stage two's configuration check each run's settings together (the strategy with its
    λ, the student with the settings), as ``kdcache train`` will."""

    def check(settings: dict, key: str) -> None:
        TrainConfig.from_dict(settings, source=f"recipe {recipe.path}", where=lambda k: where(f"{key}.{k}"))

    if recipe.teacher.train is not None:
        check({"student": recipe.teacher.preset, **recipe.teacher.train}, "teacher.train")
    student = {"student": recipe.student.preset, **recipe.student.train}
    check(student, "students.train")
    for i, s in enumerate(recipe.strategies):
        check({**student, **s.train, "strategy": s.strategy_string, "feature_loss": s.loss}, f"strategies[{i}]")


def parse_recipe(raw: dict, path: str | Path, strict: bool = True) -> Recipe:
    """Check a recipe mapping and resolve defaults.

    Args:
        raw: the parsed YAML.
        path: the recipe file (named in every error).
        strict: expand environment variables and fail on unset ones (False: keep ``${VAR}``
            placeholders, for validating templates).

    Raises:
        ConfigError: ``recipe <path>: key '<key path>': <what is wrong>``.
    """
    path = Path(path)

    def where(key: str) -> str:
        return f"recipe {path}: key {key!r}"

    r = validated(RecipeFile, raw, where, context={"strict": strict, "source": f"recipe {path}"})
    name = r.name or path.name.removesuffix(".yaml").removesuffix(".yml")
    recipe = Recipe(
        path=path, name=name, out=Path(r.out or f"runs/{name}"), device=r.device, seed=r.seed,
        seeds=list(r.seeds or [r.seed]), data=r.data, teacher=r.teacher, store=r.store, student=r.students,
        strategies=[s.spec() for s in r.strategies], eval=r.eval.model_dump(), report=r.report.model_dump(),
        raw=copy.deepcopy(raw))
    _check_runs_together(recipe, where)
    return recipe


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
