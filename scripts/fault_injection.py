"""Fault injection for the `mea` commands that write state: kill them with SIGKILL at random moments, rerun
the same command until it finishes (20 kills in all), and check the result against an uninterrupted run; then damage files
on purpose (full disk, truncated or bit-flipped weights, a pickle payload, another architecture, a foreign
tokenizer) and check that each is refused with a clear error and that nothing already saved is lost.

    python scripts/fault_injection.py --out results/faults            # the full run (~20 min on 2 cores)
    python scripts/fault_injection.py --out results/faults --render   # rewrite docs/reliability.md only

Everything runs on tiny models and text made here (no downloads). Each kill stops the command's whole
process group (SIGSTOP), records which phase it is in, then SIGKILLs it:
    loading    before the command computes anything (imports, data, models, resuming state)
    computing  training / calibrating / fitting
    checkpoint a training or recovery checkpoint is being written (a hidden temporary of it exists)
    output     the final output (model directory, report, status files) is being written
Kills are aimed at each phase in turn: the phase's start is watched for (every few ms) and the kill comes
after a random delay drawn from that phase's duration in the uninterrupted run (seeded). The phase
recorded is the one found at the moment of the kill.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path[:0] = [str(SRC), str(ROOT / "tests")]  # the package, and the tests' helpers (tiny models)

PHASES = ("loading", "computing", "checkpoint", "output")
COMMAND_LINE = "python scripts/fault_injection.py --out results/faults"
KILLS = {"train": 6, "compress": 5, "recover": 6, "study lr": 3}  # 20; the study is the slowest to rerun


# ----------------------------------------------------------------------------------------------- fixtures

def make_fixtures(work: Path) -> dict:
    """Tiny training text, and the tests' tiny random Llama with a small BPE tokenizer."""
    from helpers import save_tiny_llama

    from mea.data import corpus_dir

    text = work / "text"
    text.mkdir(parents=True, exist_ok=True)
    for name in ("macbeth_gut.txt", "tempest_gut.txt"):
        (text / name).write_text((corpus_dir() / name).read_text(encoding="utf-8")[:60_000])
    llama = work / "llama"
    if not (llama / "model.safetensors").is_file():
        save_tiny_llama(llama)
    return {"text": text, "llama": llama}


# ----------------------------------------------------------------------------------------------- commands

@dataclasses.dataclass
class Command:
    name: str
    argv: object  # (out dir, fixtures) -> list of CLI arguments after `mea`
    compute_marker: object  # (stderr text, out dir, attempt start time) -> bool
    compare: object  # (out dir) -> dict of comparable things (tensors and values)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{path.name}:{k}": v for k, v in load_file(path).items()}


def _metrics(path: Path) -> list:
    keys = ("step", "loss", "loss_ema", "lr", "grad_norm", "val_loss", "diverged")
    return [{k: r[k] for k in keys if k in r} for r in map(json.loads, path.read_text().splitlines())]


def _newer(paths, t0: float) -> bool:
    return any(p.stat().st_mtime >= t0 for p in paths if p.exists())


TRAIN_ARGS = ["--preset", "tiny", "--variant", "mea", "--seq-len", "32", "--batch-size", "4", "--steps", "16",
              "--warmup-steps", "2", "--log-every", "1", "--eval-every", "4", "--eval-windows", "4",
              "--save-every", "2", "--quiet"]


def train_command() -> Command:
    def compare(out):
        status = json.loads((out / "status.json").read_text())
        return {**_tensors(out / "model" / "model.safetensors"), "metrics": _metrics(out / "metrics.jsonl"),
                "status": (status["state"], status["step"])}

    return Command("train", lambda out, fx: ["train", "--out", out, "--resume", "--data", fx["text"], *TRAIN_ARGS],
                   lambda err, out, t0: _newer([out / "run.json"], t0), compare)


def compress_command() -> Command:
    def compare(out):
        prov = json.loads((out / "mea_provenance.json").read_text())
        probe = json.loads((out / "probe.json").read_text())  # a resumed probe measures what an unbroken one does
        return {**_tensors(out / "model.safetensors"), "plan": prov["plan"], "fit": prov["layerwise_fit"],
                "probe": {k: probe[k] for k in ("base_loss", "delta_loss")}}

    # the KV budget sized by the probe (the default allocation): its progress file is part of what must resume
    return Command("compress", lambda out, fx: ["compress", fx["llama"], out, "--kv-budget", "0.67",
                                                "--calib-windows", "4", "--calib-window", "64", "--fit-steps", "3",
                                                "--no-eval", "--overwrite"],
                   lambda err, out, t0: "calibrating" in err, compare)


def recover_command() -> Command:
    def compare(out):
        prov = json.loads((out / "mea_provenance.json").read_text())
        distill = {k: v for k, v in prov["recovery"]["distill"].items() if not k.endswith("seconds_per_step")}  # timings
        return {**_tensors(out / "model.safetensors"), "distill": distill}

    return Command("recover", lambda out, fx: ["recover", fx["compressed"], out, "--teacher", fx["llama"],
                                               "--tokens", "1024", "--seq-len", "64", "--batch", "2",
                                               "--retrieval-frac", "0",  # 64 tokens hold no retrieval sequence
                                               "--save-every", "2", "--no-eval", "--overwrite"],
                   lambda err, out, t0: "recover:" in err, compare)


def study_command() -> Command:
    def compare(out):
        got = {"plan": json.loads((out / "study.json").read_text())}
        for run in sorted((out / "runs").iterdir()):
            got.update({f"{run.name}/{k}": v for k, v in _tensors(run / "model" / "model.safetensors").items()})
            got[f"{run.name}/metrics"] = _metrics(run / "metrics.jsonl")
        json.loads((out / "summary.json").read_text())
        assert (out / "report.md").is_file()
        return got

    return Command("study lr", lambda out, fx: ["study", "lr", out, "--variants", "baseline", "mea", "--lrs", "1e-3",
                                                "--seeds", "0", "--steps", "2", "--data", fx["text"]],
                   lambda err, out, t0: _newer((out / "runs").glob("*/run.json"), t0), compare)


COMMANDS = {c.name: c for c in (train_command(), compress_command(), recover_command(), study_command())}


# ----------------------------------------------------------------------------------------------- processes

def _env(work: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "MEA_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start(argv, work: Path, log: Path) -> subprocess.Popen:
    err = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "mea", *map(str, argv)], stdout=subprocess.DEVNULL, stderr=err,
                            env=_env(work), start_new_session=True)


def run_to_end(argv, work: Path, log: Path, timeout: float = 600) -> tuple[int, str]:
    proc = _start(argv, work, log)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    return code, log.read_text(errors="replace")


def group_pids(pgid: int) -> set[int]:
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.add(int(d.name))
    return pids


TMP = re.compile(r"^\..+\.tmp-(\d+)-")


def temporaries(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if TMP.match(name):
                found.append(Path(dirpath) / name)
    return found


def phase_of(cmd: Command, out: Path, log: Path, t0: float, *, pids: set[int] | None = None,
             ignore: frozenset = frozenset()) -> str:
    tmps = [p for p in temporaries(out.parent) if p not in ignore
            and (pids is None or int(TMP.match(p.name)[1]) in pids)]
    if any("checkpoints" in p.parts or p.name.startswith(f".{out.name}.state.")
           or any(part.endswith(".state") for part in p.parts) for p in tmps):
        return "checkpoint"
    if tmps:
        return "output"
    return "computing" if cmd.compute_marker(log.read_text(errors="replace"), out, t0) else "loading"


def watch(cmd: Command, argv, out: Path, log: Path, work: Path, *, kill_at=None, poll: float = 0.004):
    """Run the command; record the phase timeline. With `kill_at` (a function of (phase, seconds in it,
    segment index) -> bool), stop the process group when it says so, record the phase, and SIGKILL."""
    out.parent.mkdir(parents=True, exist_ok=True)
    ignore = frozenset(temporaries(out.parent))
    t0 = time.time()
    proc = _start(argv, work, log)
    segments, current, since = [], None, t0
    while proc.poll() is None:
        now = time.time()
        phase = phase_of(cmd, out, log, t0, ignore=ignore)
        if phase != current:
            if current is not None:
                segments.append((current, since - t0, now - t0))
            current, since = phase, now
        index = sum(1 for s in segments if s[0] == phase)
        if kill_at is not None and kill_at(phase, now - since, index):
            try:
                os.killpg(proc.pid, signal.SIGSTOP)
            except ProcessLookupError:
                break
            hit = phase_of(cmd, out, log, t0, pids=group_pids(proc.pid), ignore=ignore)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"killed": True, "phase": hit, "at_s": round(time.time() - t0, 3), "segments": segments}
        time.sleep(poll)
    segments.append((current, since - t0, time.time() - t0))
    return {"killed": False, "code": proc.returncode, "segments": segments, "seconds": round(time.time() - t0, 2)}


# ----------------------------------------------------------------------------------------------- checks

def damaged_files(out: Path) -> list[str]:
    """Visible files that should be complete but do not load / parse; checkpoints `latest` names that do not
    load."""
    import torch
    from safetensors.torch import load_file

    from mea.train.state import latest_checkpoint, load_checkpoint

    bad = []
    for dirpath, dirnames, filenames in os.walk(out.parent):  # the output and, beside it, any *.state
        dirnames[:] = [d for d in dirnames if not TMP.match(d)]
        for name in filenames:
            if TMP.match(name):
                continue
            p = Path(dirpath) / name
            try:
                if name.endswith(".safetensors"):
                    load_file(p)
                elif name.endswith(".json") and p.stat().st_size:
                    json.loads(p.read_text())
                elif name.endswith(".pt"):
                    torch.load(p, weights_only=True)
            except Exception as e:
                bad.append(f"{p.relative_to(out.parent)}: {type(e).__name__}: {str(e)[:120]}")
    for run in [out, *(out / "runs").glob("*")] if (out / "runs").is_dir() else [out]:
        try:
            ckpt = latest_checkpoint(run)
            if ckpt is not None:
                load_checkpoint(ckpt)
        except ValueError as e:
            bad.append(f"{run.relative_to(out.parent)}/checkpoints: {str(e)[:160]}")
    return bad


def leftovers(trial: Path) -> list[str]:
    left = [str(p.relative_to(trial)) for p in temporaries(trial)]
    left += [str(p.relative_to(trial)) for p in trial.glob("*.state")]
    left += [str(p.relative_to(trial)) for p in trial.glob("*.probe-progress.json")]
    return left


def same(a: dict, b: dict) -> list[str]:
    """Names of the entries that differ (tensors bit for bit, dtype included)."""
    import torch

    diff = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                diff.append(k)
        elif x != y:
            diff.append(k)
    return diff


def loads_as_model(path: Path) -> bool:
    from mea.checkpoint import load_causal_lm

    load_causal_lm(path)
    return True


def model_dirs(out: Path) -> list[Path]:
    return [p.parent for p in out.rglob("config.json") if not any(TMP.match(x) for x in p.parts)
            and "checkpoints" not in p.parts and "tokenizer" not in p.parts]


# ----------------------------------------------------------------------------------------------- kill trials

def kill_trials(cmd: Command, fx: dict, work: Path, n: int, rng: random.Random, log) -> dict:
    base = work / cmd.name.replace(" ", "_")
    ref_out = base / "reference" / "out"
    ref_out.parent.mkdir(parents=True, exist_ok=True)
    ref = watch(cmd, cmd.argv(ref_out, fx), ref_out, base / "reference" / "log.txt", work)
    if ref["code"] != 0:
        raise RuntimeError(f"{cmd.name}: the uninterrupted run failed:\n{(base / 'reference' / 'log.txt').read_text()[-3000:]}")
    reference = cmd.compare(ref_out)
    durations: dict[str, list[float]] = {}
    for phase, a, b in ref["segments"]:
        durations.setdefault(phase, []).append(b - a)
    targets = [p for p in PHASES if p in durations]
    log(f"{cmd.name}: uninterrupted {ref['seconds']} s; phases seen {({p: len(v) for p, v in durations.items()})}")
    trials = []
    for i in range(n):
        target = targets[i % len(targets)]
        trial = base / f"trial-{i}"
        shutil.rmtree(trial, ignore_errors=True)
        trial.mkdir(parents=True)
        out = trial / "out"
        record = {"trial": i, "target": target}
        for attempt in range(4):  # a kill aimed at a short phase can miss it; aim again
            segment = rng.randrange(len(durations[target]))
            delay = rng.uniform(0, durations[target][segment])
            record.update(segment=segment, delay_s=round(delay, 3))
            killed = watch(cmd, cmd.argv(out, fx), out, trial / f"log-{attempt}.txt", work,
                           kill_at=lambda ph, t, k: ph == target and (k > segment or (k == segment and t >= delay)))
            if killed["killed"]:
                break
            if killed["code"] == 0:  # it finished before the aim: start over clean
                shutil.rmtree(out, ignore_errors=True)
                for extra in trial.glob("*.state"):
                    shutil.rmtree(extra)
        if not killed["killed"]:
            record["outcome"] = "missed"
            trials.append(record)
            log(f"  {cmd.name} #{i}: aimed at {target}, never hit")
            continue
        record.update(phase=killed["phase"], at_s=killed["at_s"], damaged_after_kill=damaged_files(out))
        reruns, code = 0, None
        while reruns < 3 and code != 0:
            reruns += 1
            code, err = run_to_end(cmd.argv(out, fx), work, trial / f"rerun-{reruns}.txt")
        record.update(reruns=reruns, rerun_code=code)
        if code != 0:
            record["rerun_error"] = err.strip().splitlines()[-1][:300] if err.strip() else ""
            differs, left, load_errors = ["(no result)"], leftovers(trial), []
        else:
            differs = same(cmd.compare(out), reference)
            left = leftovers(trial)
            load_errors = damaged_files(out)
            for d in model_dirs(out):
                try:
                    loads_as_model(d)
                except ValueError as e:
                    load_errors.append(f"{d.relative_to(out)}: {e}")
        record.update(identical=not differs, differs=differs[:5], leftovers=left, load_errors=load_errors)
        record["data_lost"] = bool(record["damaged_after_kill"]) or code != 0
        record["survived"] = code == 0 and not differs and not left and not load_errors and not record["data_lost"]
        trials.append(record)
        log(f"  {cmd.name} #{i}: aimed at {target}, hit {record['phase']} at {record['at_s']} s; reruns {reruns}; "
            f"{'survived' if record['survived'] else 'FAILED ' + json.dumps({k: record[k] for k in ('differs', 'leftovers', 'load_errors', 'damaged_after_kill')})}")
        shutil.rmtree(trial, ignore_errors=True)
    return {"command": "mea " + " ".join(map(str, cmd.argv(Path("OUT"), {k: Path(k.upper()) for k in fx}))),
            "uninterrupted_s": ref["seconds"], "reference_phases_s": {p: round(sum(v), 2) for p, v in durations.items()},
            "trials": trials, "reference_out": ref_out}


# ----------------------------------------------------------------------------------------------- special faults

def _hashes(root: Path, skip: tuple[Path, ...] = ()) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p not in skip:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _expect(name: str, fault: str, argv, work: Path, case: Path, patterns: list[str], *, damaged=(),
            after=None) -> dict:
    """Run `argv`; it must exit with code 2 (a clear error, no traceback) matching every pattern, and leave
    every file in `case` (but the damaged ones) unchanged."""
    before = _hashes(case, tuple(damaged))
    code, err = run_to_end(argv, work, case.parent / f"{case.name}.log")
    message = next((l for l in err.splitlines() if l.startswith("mea ")), err.strip().splitlines()[-1] if err.strip() else "")
    after_hashes = _hashes(case, tuple(damaged))
    changed = sorted(k for k in before if after_hashes.get(k) != before[k])
    result = {"case": name, "fault": fault, "command": "mea " + " ".join(map(str, argv)).replace(str(work), "WORK"),
              "exit_code": code, "message": message.replace(str(work), "WORK")[:600],
              "clear_error": code == 2 and "Traceback" not in err and all(re.search(p, err, re.I) for p in patterns),
              "saved_files_changed": changed, "new_leftovers": [str(p) for p in temporaries(case)]}
    if after is not None:
        result.update(after())
    result["passed"] = result["clear_error"] and not changed and not result["new_leftovers"] and result.get("ok", True)
    return result


def special_faults(fx: dict, refs: dict, work: Path, log) -> list[dict]:
    import mea
    from mea.train.state import latest_checkpoint, load_checkpoint, save_checkpoint

    root = work / "special"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    results = []
    train_ref, comp_ref = refs.get("train"), refs.get("compress")

    def train_copy(name):
        case = root / name
        shutil.copytree(train_ref, case)
        return case, latest_checkpoint(case)

    def train_argv(run):
        return ["train", "--out", run, "--resume", "--data", fx["text"], *TRAIN_ARGS]

    def recover_argv(src, name):
        return ["recover", src, root / name, "--teacher", fx["llama"], "--tokens", "256", "--seq-len", "64",
                "--batch", "2", "--no-eval"]

    # full disk during a checkpoint write
    if train_ref is not None:
        results.append(_disk_full(fx, train_ref, work, root, train_argv, log))
    if train_ref is not None:
        case, ckpt = train_copy("truncated-train-checkpoint")
        f = ckpt / "model.safetensors"
        os.truncate(f, f.stat().st_size * 6 // 10)
        results.append(_expect("truncated training checkpoint", "truncated safetensors", train_argv(case), work, case,
                               [re.escape(str(f)), "damaged|checksum", "--overwrite"], damaged=(f,)))
        case, ckpt = train_copy("bitflip-train-checkpoint")
        _flip_bit(ckpt / "model.safetensors")
        results.append(_expect("bit-flipped training checkpoint", "bit-flipped safetensors", train_argv(case), work,
                               case, ["model.safetensors", "checksum", "--overwrite"],
                               damaged=(ckpt / "model.safetensors",)))
        # a pickle payload in the optimizer state; its checksum rewritten, as a deliberate attacker would
        case, ckpt = train_copy("pickle-optimizer-state")
        marker = root / "PAYLOAD-RAN"
        _write_payload(ckpt / "trainer_state.pt", marker)
        _rewrite_checksum(ckpt, "trainer_state.pt")
        results.append(_expect("pickle payload in trainer_state.pt", "optimizer state with a pickle payload",
                               train_argv(case), work, case, ["trainer_state.pt", "refusing"],
                               damaged=(ckpt / "trainer_state.pt", ckpt / "checksums.sha256"),
                               after=lambda: {"payload_ran": marker.exists(), "ok": not marker.exists()}))
        # a checkpoint of another architecture (a 1-layer model) where the run's checkpoint was
        case, ckpt = train_copy("other-architecture-checkpoint")
        state, trainer_state = load_checkpoint(ckpt)
        other = mea.MEAForCausalLM(mea.make_config("tiny", "mea", num_hidden_layers=1))
        shutil.rmtree(ckpt)
        save_checkpoint(case, int(ckpt.name.split("-")[1]), other.state_dict(), trainer_state)
        results.append(_expect("checkpoint of another architecture", "checkpoint of another architecture",
                               train_argv(case), work, case, ["another architecture", "--overwrite"]))
    if comp_ref is not None:
        for name, fault, damage in (("truncated compressed model", "truncated safetensors",
                                     lambda f: os.truncate(f, f.stat().st_size // 2)),
                                    ("bit-flipped compressed model", "bit-flipped safetensors", _flip_bit)):
            case = root / name.replace(" ", "-")
            shutil.copytree(comp_ref, case)
            damage(case / "model.safetensors")
            results.append(_expect(name + " given to recover", fault, recover_argv(case, case.name + "-out"), work,
                                   case, ["model.safetensors", "checksum|damaged", "write it again"],
                                   damaged=(case / "model.safetensors",)))
        case = root / "recover-from-llama"
        shutil.copytree(fx["llama"], case)
        results.append(_expect("recover given an uncompressed Llama", "checkpoint of another architecture",
                               recover_argv(case, "llama-out"), work, case, ["LlamaForCausalLM", "compressed MEA"]))
        # config.json of another size than the weights
        case = root / "config-of-another-size"
        shutil.copytree(fx["llama"], case)
        cfg = json.loads((case / "config.json").read_text())
        cfg["intermediate_size"] = 192
        (case / "config.json").write_text(json.dumps(cfg))
        results.append(_expect("weights of another architecture than config.json", "checkpoint of another architecture",
                               ["compress", case, root / "size-out", "--virtual-heads", "2", "--no-eval"], work, case,
                               ["could not load the model", "do not fit its config.json", "put back"]))
    if train_ref is not None:
        # the tokenizer of another model (the trained run's 512-token BPE) beside the 320-token Llama
        case = root / "foreign-tokenizer"
        shutil.copytree(fx["llama"], case)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(train_ref / "model" / name, case / name)
        results.append(_expect("tokenizer of another model beside the weights", "tokenizer that does not match the model",
                               ["compress", case, root / "tok-out", "--virtual-heads", "2", "--no-eval"], work, case,
                               ["tokenizer", "another model", "Copy the tokenizer"]))
        case = root / "train-foreign-tokenizer"
        case.mkdir()
        results.append(_expect("--tokenizer larger than the model's vocabulary", "tokenizer that does not match the model",
                               ["train", "--out", case / "run", "--data", fx["text"], "--tokenizer",
                                train_ref / "tokenizer", "--set", "vocab_size=256", *TRAIN_ARGS], work, case,
                               ["512 tokens", "vocab_size=512"]))
    for r in results:
        log(f"  special: {r['case']}: {'passed' if r['passed'] else 'FAILED'} (exit {r['exit_code']}): {r['message'][:200]}")
    return results


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0x10
    path.write_bytes(bytes(data))


class _Payload:
    """Unpickling this would create a file (a stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_payload(path: Path, marker: Path) -> None:
    import torch

    state = torch.load(path, weights_only=True)
    state["scheduler"] = _Payload(marker)
    torch.save(state, path)


def _rewrite_checksum(directory: Path, name: str) -> None:
    from mea.checkpoint import CHECKSUMS

    digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    lines = [f"{digest}  {name}" if l.endswith(f"  {name}") else l
             for l in (directory / CHECKSUMS).read_text().splitlines()]
    (directory / CHECKSUMS).write_text("\n".join(lines) + "\n")


def _disk_full(fx, train_ref: Path, work: Path, root: Path, train_argv, log) -> dict:
    name, fault = "full disk during a checkpoint write", "full disk"
    if os.geteuid() != 0:
        return {"case": name, "fault": fault, "skipped": "needs root to mount a small tmpfs", "passed": None}
    disk = root / "disk"
    disk.mkdir()
    page = 4096

    def size(p: Path) -> int:
        return sum(-(-f.stat().st_size // page) * page for f in p.rglob("*") if f.is_file()) if p.is_dir() else \
            -(-p.stat().st_size // page) * page

    ckpt = size(next((train_ref / "checkpoints").glob("step-*")))
    base = size(train_ref / "tokenizer") + 8 * page  # run.json, status, metrics, latest
    limit = base + ckpt + ckpt // 2  # the first checkpoint fits; the second one (written beside it) does not
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={limit}", "tmpfs", str(disk)], check=True)
    try:
        run = disk / "run"
        code, err = run_to_end(train_argv(run), work, root / "disk-full.log")
        latest = (run / "checkpoints" / "latest").read_text().strip() if (run / "checkpoints" / "latest").exists() else None
        kept_ok = not damaged_files(run) and latest is not None
        message = next((l for l in err.splitlines() if l.startswith("mea ")), err.strip()[-300:])
        clear = code == 2 and "Traceback" not in err and "no space left" in err.lower() and "df -h" in err
        left = [str(p.relative_to(disk)) for p in temporaries(disk)]
        # the fix the message gives: free space, run the same command again
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        code2, _ = run_to_end(train_argv(run), work, root / "disk-full-rerun.log")
        identical = code2 == 0 and not same(COMMANDS["train"].compare(run), COMMANDS["train"].compare(train_ref))
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    return {"case": name, "fault": fault, "command": f"mea train (tmpfs of {limit} bytes; one checkpoint = {ckpt})",
            "exit_code": code, "message": message.replace(str(work), "WORK")[:600], "clear_error": clear,
            "checkpoint_kept": latest, "kept_checkpoint_loads": kept_ok, "new_leftovers": left,
            "rerun_after_freeing_space": {"exit_code": code2, "identical_to_uninterrupted": identical},
            "passed": clear and kept_ok and not left and identical}


# ----------------------------------------------------------------------------------------------- report

def summarize(per_command: dict) -> dict:
    counts = {}
    for name, res in per_command.items():
        c = {"kills": 0, "survived": 0, "data_lost": 0, "identical": 0, "missed": 0,
             "by_phase": {p: {"kills": 0, "survived": 0, "data_lost": 0} for p in PHASES}}
        for t in res["trials"]:
            if t.get("outcome") == "missed":
                c["missed"] += 1
                continue
            c["kills"] += 1
            c["survived"] += t["survived"]
            c["data_lost"] += t["data_lost"]
            c["identical"] += t["identical"]
            ph = c["by_phase"][t["phase"]]
            ph["kills"] += 1
            ph["survived"] += t["survived"]
            ph["data_lost"] += t["data_lost"]
        counts[name] = c
    total = {k: sum(c[k] for c in counts.values()) for k in ("kills", "survived", "data_lost", "identical", "missed")}
    total["by_phase"] = {p: {k: sum(c["by_phase"][p][k] for c in counts.values()) for k in ("kills", "survived", "data_lost")}
                         for p in PHASES}
    return {"total": total, "per_command": counts}


def render(result: dict) -> str:
    s = result["summary"]
    t = s["total"]
    lines = ["# Reliability: kills and damaged files", "",
             f"Generated by `{result['command_line']}` from `results/faults/faults.json` "
             f"({result['machine']}, {result['date']}, commit {result['commit']}).", "",
             f"**{t['kills']} SIGKILLs, {t['survived']} survived, {t['data_lost']} lost data** "
             f"({t['identical']} reruns bit-identical to the uninterrupted run).", "",
             "Each kill stops the command's whole process group at a random moment (aimed at each phase in turn, "
             "seeded), then the same command is run again until it finishes. A kill *survived* when the rerun "
             "finished, every output is bit-identical to an uninterrupted run's (safetensors tensors, losses, "
             "plans), every file loads, and no hidden temporary or state directory is left. *Data lost*: right after "
             "the kill a visible file or the checkpoint `latest` names did not load, or no rerun could finish.", "",
             "| command | kills | survived | data lost | loading | computing | checkpoint | output | uninterrupted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, c in s["per_command"].items():
        ph = " | ".join(f"{c['by_phase'][p]['survived']}/{c['by_phase'][p]['kills']}" for p in PHASES)
        lines.append(f"| `mea {name}` | {c['kills']} | {c['survived']} | {c['data_lost']} | {ph} | "
                     f"{result['commands'][name]['uninterrupted_s']} s |")
    ph = " | ".join(f"{t['by_phase'][p]['survived']}/{t['by_phase'][p]['kills']}" for p in PHASES)
    lines += [f"| all | {t['kills']} | {t['survived']} | {t['data_lost']} | {ph} | |", "",
              "Phase cells: survived / kills that hit the phase. The commands (tiny models and text made by the "
              "script):", ""]
    lines += [f"- `{c['command']}`" for c in result["commands"].values()]
    lines += ["", "## Damaged inputs and a full disk", "",
              "Each must stop with a clear error (exit code 2, no traceback, naming the file and the fix) and change "
              "nothing already saved.", "", "| fault | case | result | message |", "|---|---|---|---|"]
    for r in result["special"]:
        verdict = "skipped: " + r["skipped"] if r.get("skipped") else ("passed" if r["passed"] else "**failed**")
        msg = r.get("message", "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['fault']} | {r['case']} | {verdict} | {msg} |")
    lines += ["", "What makes this hold: directories are written under a hidden name and swapped in with one "
              "atomic rename (`renameat2(RENAME_EXCHANGE)` when replacing), files through a temporary and "
              "`os.replace`; temporaries of killed writers are removed by the next write; weights and optimizer "
              "files carry sha256 checksums (`checksums.sha256`) checked on load; torch state is loaded with "
              "`weights_only=True`; a recovery run saves its weights, optimizer and position as one directory.", ""]
    return "\n".join(lines)


def _machine() -> str:
    import platform

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    return f"{cpu}, {os.cpu_count()} cores, shared"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/faults", help="folder for faults.json")
    p.add_argument("--doc", default=str(ROOT / "docs" / "reliability.md"), help="the generated page ('' for none)")
    p.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    p.add_argument("--kills-per-command", type=int, help=f"kills for each command (default {KILLS})")
    p.add_argument("--special", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="scratch folder (default: a fresh temporary one, removed after)")
    p.add_argument("--render", action="store_true", help="only rewrite --doc from OUT/faults.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.render:
        Path(args.doc).write_text(render(json.loads((out / "faults.json").read_text())))
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mea-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    try:
        fx = make_fixtures(work)
        per_command, refs = {}, {}
        needed = list(args.commands)
        if "recover" in needed and "compress" not in needed:
            needed.insert(0, "compress")
        for name in sorted(needed, key=list(COMMANDS).index):
            n = (args.kills_per_command or KILLS[name]) if name in args.commands else 0
            res = kill_trials(COMMANDS[name], fx, work, n, rng, log)
            refs[name] = res.pop("reference_out")
            if name == "compress":
                fx["compressed"] = refs[name]
            if name in args.commands:
                per_command[name] = res
        special = special_faults(fx, refs, work, log) if args.special else []
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result = {"command_line": COMMAND_LINE if args.kills_per_command is None and args.special else
              "python scripts/fault_injection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": _machine(), "date": time.strftime("%Y-%m-%d"), "commit": commit, "seed": args.seed,
              "seconds": round(time.time() - t0), "summary": summarize(per_command), "commands": per_command,
              "special": special}
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.doc:
        Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
        Path(args.doc).write_text(render(result))
    t = result["summary"]["total"]
    print(json.dumps({"kills": t["kills"], "survived": t["survived"], "data_lost": t["data_lost"],
                      "special_passed": sum(bool(r["passed"]) for r in special), "special": len(special)}))
    return 0 if t["survived"] == t["kills"] and all(r["passed"] is not False for r in special) else 1


if __name__ == "__main__":
    sys.exit(main())
