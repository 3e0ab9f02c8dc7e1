"""The KV-compression frontier: every option on the same held-out measures, against the KV bytes it
actually holds. Each step is a subprocess skipped when its output exists, so the study resumes:

    OUT/models/METHOD-LEVEL-free     mea compress SRC ... --method METHOD --recover none   (training-free)
    OUT/models/METHOD-LEVEL-fit      mea compress SRC ... --method METHOD   (+ the default layer-wise fit; value
                                     latents with every layer at LEVEL: --allocate errors)
    OUT/models/METHOD-LEVEL-probe-O-*   the same with --allocate probe --probe-objective O (with --probe-objectives;
                                     `make run` is rope-pair-latent-0.67-probe-text-fit, the default allocation)
    OUT/models/METHOD-LEVEL-rec-sS   mea recover OUT/models/METHOD-LEVEL-fit ... --tokens N --seed S [RECOVER_ARGS]
                                     (with --recover-tokens, one per seed; a further budget M is named
                                     METHOD-LEVEL-rec{M/1024}k-sS, a longer run of the same recipe)
    (--models NAME=DIR)              MEA checkpoints made elsewhere (e.g. `mea compress --sensitivity TABLE
                                     --probe-floor F`), measured as system mea-NAME; not built by the study
    OUT/systems/NAME.MEASURE.json  `frontier_measure.measure_system` (in this process; the kvpress systems
                                   in .venv-peers: python -m mea.experiments.frontier_measure ...)
    OUT/report.md, summary.json, frontier.png

Systems: the original with its own cache; transformers' QuantizedCache on the original; kvpress presses
on the original (run by the `.venv-peers` Python, `make peers`; skipped with a note when it is absent);
MEA at each KV level for each compression method: training-free, with the layer-wise fit, and recovered
(with --recover-tokens).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .frontier_report import BY_BYTES
from .frontier_measure import MEASURES, QUICK, STUDY_DTYPE, Sizes, measure_system

LEVELS = (0.67, 0.5, 0.33)
METHODS = ("rope-pair-latent", "whitened", "svd")
QUANT = ("quanto-4", "quanto-2", "hqq-4", "hqq-2")
PRESSES = ("streamingllm", "snapkv", "expectedattention", "knorm")
PEERS_PYTHON = ".venv-peers/bin/python"


@dataclass(frozen=True)
class System:
    name: str
    family: str  # one line on the frontier plot
    model: str  # what frontier_measure loads
    cache: str  # the cache system name (mea.eval.peers)
    python: str
    # the KV fraction an MEA system was compressed to (its targets depend on it); BY_BYTES: the fraction its float
    # cache measures (a model made elsewhere, --models)
    level: float | str | None = None


def parse_models(specs) -> dict[str, str]:
    """--models NAME=DIR ...: {NAME: DIR}, names distinct."""
    models = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in models:
            raise ValueError(f"--models takes distinct NAME=DIR pairs (an MEA checkpoint folder each), got {spec!r}")
        models[name] = path
    return models


def level_args(level: float, heads: int, method: str = "whitened") -> list[str]:
    """`mea compress` arguments for keeping `level` of the KV cache: for a method with a value latent, a KV
    budget given to every layer alike (its widths need not be whole heads; the probe's sizes are the
    --probe-objectives models); otherwise a uniform h' when level x h is (within 0.05) a whole number of heads,
    else a KV budget allocated by the sensitivity probe."""
    from ..compress.methods import method_of

    if not 0 < level <= 1:
        raise ValueError(f"KV levels must be in (0, 1], got {level}")
    k = level * heads
    if method_of(method).value_mixing == "latent":
        return ["--kv-budget", str(level), "--allocate", "errors"]
    if abs(k - round(k)) < 0.05 and round(k) >= 1:
        return ["--virtual-heads", str(round(k))]
    return ["--kv-budget", str(level)]


MAIN_RECIPE = ("rec", "")  # (name, further `mea recover` flags) of the recovery when no recipe is named


def rec_tag(tokens: int, first: int, name: str = MAIN_RECIPE[0]) -> str:
    """The recovered models' name part: `name` (`rec` unless the recipe has a name of its own) for the study's
    main budget (`first`), `{name}Nk` (N = tokens / 1024) for every further budget, so that adding a budget
    renames nothing already measured."""
    return name if tokens == first else f"{name}{tokens // 1024}k"


def recipes(names: list[str] | None, args: list[str] | None) -> tuple[tuple[str, str], ...]:
    """The recovery recipes of --recover-name / --recover-args: one name per flag string (one unnamed string is
    the recipe `rec`)."""
    names, args = list(names or [MAIN_RECIPE[0]]), list(args or [MAIN_RECIPE[1]])
    if len(names) != len(args) or len(set(names)) != len(names):
        raise ValueError(f"--recover-name needs one distinct name per --recover-args string, got names {names} for "
                         f"{len(args)} string(s)")
    return tuple(zip(names, args))


def plan(src: str, out: Path, *, heads: int, levels, methods, quant, presses, recover_tokens=(),
         peers_python: str | None, recover_seeds=(0,), recover_recipes=(MAIN_RECIPE,), kv_bits=(),
         probe_objectives=(), models: dict[str, str] | None = None, device: str | None = None,
         dtype: str = STUDY_DTYPE) -> tuple[list[tuple[Path, list[str]]], list[System]]:
    """(model-building steps as (output, command)), (systems to measure). `recover_recipes`: (name, further
    `mea recover` flags) pairs, e.g. ("rec", "--lr 3e-4 --retrieval-frac 0.5"): each recipe's models are
    named by its name part (see `rec_tag`); `recover_tokens`: the recovery budgets (the first is the main one);
    `kv_bits`: also measure the original and every MEA model with our quantized cache at these bits (`mea-kvB` in
    `mea.eval.peers`); `probe_objectives`: also build every method and level with the sizes of its layers chosen
    by the probe of each objective (`mea compress --allocate probe --probe-objective O`, models
    METHOD-LEVEL-probe-O-...); `models`: {NAME: DIR} of MEA checkpoints made elsewhere, measured as mea-NAME (one
    plot line per NAME without its -sS seed part), their targets those of the KV fraction they hold."""
    mea = [sys.executable, "-m", "mea"]
    on = ["--device", device] if device else []  # compress and recover place themselves; compress computes in dtype
    steps, systems = [], [System("original", "original", src, "default", sys.executable)]
    systems += [System(q, q.split("-")[0] + " (QuantizedCache)", src, q, sys.executable) for q in quant]
    if peers_python:
        systems += [System(f"kvpress-{p}-{kept}", f"kvpress {p}", src, f"kvpress-{p}-{kept}", peers_python)
                    for p in presses for kept in levels]
    for method in methods:
        for level in levels:
            variants = [("", "", level_args(level, heads, method))]  # (name part, family part, compress arguments)
            variants += [(f"-probe-{o}", f", {o} probe", ["--kv-budget", str(level), "--allocate", "probe",
                                                           "--probe-objective", o]) for o in probe_objectives]
            for part, kind, level_flags in variants:
                name = f"{method}-{level}{part}"
                args = ["--method", method, *level_flags, *on, "--dtype", dtype]
                free, fit = (out / "models" / f"{name}-{k}" for k in ("free", "fit"))
                steps.append((free, mea + ["compress", src, str(free), *args, "--recover", "none", "--no-eval"]))
                steps.append((fit, mea + ["compress", src, str(fit), *args, "--no-eval"]))
                systems.append(System(f"mea-{name}-free", f"MEA {method}{kind} (training-free)", str(free), "default",
                                      sys.executable, level))
                systems.append(System(f"mea-{name}-fit", f"MEA {method}{kind} (layer-wise fit)", str(fit), "default",
                                      sys.executable, level))
                for (recipe, recipe_args), tokens in ((r, t) for r in recover_recipes for t in recover_tokens):
                    tag = rec_tag(tokens, recover_tokens[0], recipe)
                    family = "recovered" + ("" if recipe == MAIN_RECIPE[0] else f" by {recipe}") + \
                        ("" if tag == recipe else f", {tokens} tokens")
                    for seed in recover_seeds:
                        rec = out / "models" / f"{name}-{tag}-s{seed}"
                        steps.append((rec, mea + ["recover", str(fit), str(rec), "--teacher", src, "--tokens",
                                                  str(tokens), "--seed", str(seed), *on, *shlex.split(recipe_args),
                                                  "--no-eval"]))
                        systems.append(System(f"mea-{name}-{tag}-s{seed}", f"MEA {method}{kind} ({family})",
                                              str(rec), "default", sys.executable, level))
    for name, path in (models or {}).items():
        family = f"MEA {re.sub(r'-s[0-9]+$', '', name)}"
        systems.append(System(f"mea-{name}", family, path, "default", sys.executable, BY_BYTES))
    systems += [System(f"{s.name}+int{bits}", f"{s.family} + int{bits} cache", s.model, f"mea-kv{bits}", s.python)
                for bits in kv_bits for s in list(systems) if s.cache == "default"]
    return steps, systems


def needed_steps(steps: list[tuple[Path, list[str]]], models: set[str]) -> list[tuple[Path, list[str]]]:
    """The steps that build `models` and the models those steps read (a recovery needs its fitted model)."""
    built, needed, keep = {str(t) for t, _ in steps}, set(models), []
    for target, cmd in reversed(steps):  # a step comes after every step it reads from
        if str(target) in needed:
            keep.append((target, cmd))
            needed.update(a for a in cmd if a in built)
    return keep[::-1]


def _run(cmd: list[str], log_path: Path, log) -> None:
    log(" ".join(cmd[2:]))
    with open(log_path, "a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise ValueError(f"step failed (exit {code}): {' '.join(cmd[2:])}; see {log_path}")


def run_frontier(out: str | Path, *, src: str = "smollm2", levels=LEVELS, methods=METHODS, quant=QUANT,
                 presses=PRESSES, recover_tokens=(), recover_seeds=(0,), recover_recipes=(MAIN_RECIPE,), kv_bits=(),
                 probe_objectives=(), models: dict[str, str] | None = None, only=(), quick: bool = False,
                 sizes: Sizes | None = None,
                 measures=MEASURES, peers_python: str = PEERS_PYTHON, heads: int | None = None, report_only: bool = False,
                 device: str | None = None, dtype: str = STUDY_DTYPE, log=print) -> dict:
    """Build the MEA models, measure every system (each measure skipped when its file exists), write the
    report; `only`: measure just the systems whose names match one of these patterns (fnmatch); `report_only`:
    just the report from the results present; `device`, `dtype`: where and in what the models are built and
    measured (recovery trains in fp32 weights whatever `dtype`)."""
    out = Path(out)
    if quick and sizes is not None:
        raise ValueError("pass either quick or explicit sizes, not both")
    sizes = sizes or (QUICK if quick else Sizes())
    unknown = sorted(set(measures) - set(MEASURES))
    if unknown:
        raise ValueError(f"unknown measure(s) {unknown}; choose from {', '.join(MEASURES)}")
    peers = peers_python if presses and Path(peers_python).is_file() else None
    notes = [] if peers or not presses else [f"kvpress presses skipped: {peers_python} not found (run `make peers`)."]
    load = _last_model_loader()
    if heads is None:  # only MEA levels need it
        from ..precision import placement

        heads = load(src, placement(device, dtype)[1]).model.config.num_key_value_heads if methods and not report_only else 1
    steps, systems = plan(src, out, heads=heads, levels=levels, methods=methods, quant=quant, presses=presses,
                          recover_tokens=recover_tokens, peers_python=peers, recover_seeds=recover_seeds,
                          recover_recipes=recover_recipes, kv_bits=kv_bits,
                          probe_objectives=probe_objectives, models=models,
                          device=device, dtype=dtype)
    (out / "systems").mkdir(parents=True, exist_ok=True)
    if report_only:
        return write_report(out, systems, notes=notes)
    (out / "logs").mkdir(exist_ok=True)
    chosen = [s for s in systems if not only or any(fnmatch.fnmatch(s.name, p) for p in only)]
    if only:
        steps = needed_steps(steps, {s.model for s in chosen})
    for s in chosen:
        if s.level == BY_BYTES and not (Path(s.model) / "config.json").is_file():
            raise ValueError(f"--models {s.name[len('mea-'):]}={s.model}: no config.json there; give the folder of an "
                             "MEA checkpoint (written by `mea compress` or `mea recover`)")
    for target, cmd in steps:
        if target.exists():
            continue
        with _claim(out / "logs" / f"{target.name}.lock") as mine:
            if mine:
                _run(cmd, out / "logs" / f"{target.name}.log", log)
            else:
                log(f"{target.name}: being built by another running study process; skipped")
    for s in chosen:
        if all((out / "systems" / f"{s.name}.{m}.json").exists() for m in measures):
            continue
        with _claim(out / "systems" / f"{s.name}.lock") as mine:
            if not mine:
                log(f"{s.name}: being measured by another running study process; skipped")
                continue
            if s.python == sys.executable:  # our environment: measured in this process
                measure_system(s.model, out / "systems", name=s.name, system=s.cache, sizes=sizes, measures=measures,
                               device=device, dtype=dtype, log=log, load=load)
            else:
                cmd = [s.python, "-m", "mea.experiments.frontier_measure", s.model, str(out / "systems"), "--name",
                       s.name, "--system", s.cache, "--sizes", json.dumps(asdict(sizes)), "--measures", *measures,
                       *(["--device", device] if device else []), "--dtype", dtype]
                _run(cmd, out / "logs" / f"{s.name}.log", log)
        write_report(out, systems, notes=notes)  # after every system, so a partial run reports
    return write_report(out, systems, notes=notes)


@contextlib.contextmanager
def _claim(lock: Path):
    """Yield True when this process may measure the system: several study processes can share one OUT (each
    takes the systems no other live process holds). A lock left by a dead process is taken over."""
    tmp = lock.with_name(f".{lock.name}.{os.getpid()}")
    tmp.write_text(str(os.getpid()))
    try:
        for _ in range(2):
            try:
                os.link(tmp, lock)  # atomic: fails when the lock exists
                break
            except FileExistsError:
                try:
                    os.kill(int(lock.read_text()), 0)
                    yield False
                    return
                except (ProcessLookupError, ValueError, FileNotFoundError):
                    lock.unlink(missing_ok=True)  # its owner is gone
        else:
            yield False
            return
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def _last_model_loader():
    """`load_source`, keeping the last model loaded: the original's systems (its own cache, quantized caches)
    share one model (its caches are separate objects, so sharing it changes no result)."""
    from ..convert import load_source

    last = {}

    def load(src: str, dtype):
        if (src, dtype) not in last:
            last.clear()
            last[src, dtype] = load_source(src, dtype=dtype)
        return last[src, dtype]

    return load


def write_report(out: Path, systems: list[System], *, notes: list[str] = ()) -> dict:
    from .frontier_report import write_frontier_report

    return write_frontier_report(out, [asdict(s) for s in systems], notes=list(notes))
