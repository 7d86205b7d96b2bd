"""Many generations from one list of jobs, each written exactly once: ``vqclip batch``.

A jobs file is plain text (one prompt per line; blank lines and ``#`` comments skipped), YAML (a
list whose items are a prompt or a mapping of a prompt and its own settings) or JSONL (one JSON
string or object per line). A job's settings are flat keys (``seed``, ``steps``, ``size``,
``candidates``...; :data:`vqclip.config.FLAT_KEYS`) or dotted ones (``optim.lr``), over the
batch's common settings. Every job of a batch uses the batch's models: one load serves them all.

Each job has a stable id, a short hash of its resolved config (prompt, seed and settings; not
the device or outputs). A job without a seed takes one derived from its own settings, so a rerun
makes the same image; line numbers are not ids, since files get edited. Its files:

    DIR/img/<id>.png          (candidates: <id>-<k>.png and <id>-ranking.json)
    DIR/meta/<id>.json        written last, atomically: the job is finished when this exists
    DIR/manifest.jsonl        one line per finished job; rebuilt from meta/ when it disagrees
    DIR/failed.jsonl          the failed jobs not finished since: job, error, attempts

A rerun runs only the jobs without a ``meta/`` file, and each is checked again just before it
starts, so that runs sharing a folder (``--shard``, or a second machine) never redo one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from omegaconf import DictConfig, OmegaConf

from .images import atomic_path

__all__ = ["Job", "BatchReport", "begin", "finished", "job_id", "plan", "read_jobs",
           "rebuild_manifest", "record_outcome", "run_job", "run_jobs", "shard"]

# what a job may not set: one model load and one device serve the batch, and the batch names
# the outputs
_FIXED = ("models.", "output.", "device", "animation.")


@dataclass(frozen=True)
class Job:
    """One generation of a batch: where it came from (``line`` of the jobs file), its resolved
    config (outputs filled in) and its id."""

    line: int
    id: str
    config: DictConfig

    @property
    def prompt(self) -> str:
        return self.config.prompts.text


def read_jobs(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """The jobs of a file, each as (line number, settings with at least a ``prompt``).

    Raises:
        ValueError: ``path:line: what is wrong``; FileNotFoundError.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        items = _yaml_items(path, text)
    elif path.suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    else:
        items = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
                 if line.strip() and not line.lstrip().startswith("#")]
    jobs = []
    for n, item in items:
        settings = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(settings, dict):
            raise ValueError(f"{path}:{n}: a job is a prompt or a mapping of settings, "
                             f"not {type(item).__name__}")
        if not isinstance(settings.get("prompt"), str) or not settings["prompt"].strip():
            raise ValueError(f"{path}:{n}: a job needs a prompt")
        jobs.append((n, settings))
    if not jobs:
        raise ValueError(f"{path}: no jobs in it")
    return jobs


def _yaml_items(path: Path, text: str) -> list[tuple[int, Any]]:
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise ValueError(f"{path}:{node.start_mark.line + 1}: a YAML jobs file is a list of jobs")
        return [(item.start_mark.line + 1, loader.construct_object(item, deep=True))
                for item in node.value]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: not YAML ({getattr(e, 'problem', None) or e})") from None
    finally:
        loader.dispose()


def job_id(cfg: DictConfig) -> str:
    """12 hex digits that name a job: a hash of its config but the device and outputs."""
    data = OmegaConf.to_container(cfg)
    for key in ("device", "output", "preset"):
        data.pop(key)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan(jobs: Iterable[tuple[int, dict[str, Any]]], common: DictConfig, out: str | Path,
         repeat: int = 1) -> list[Job]:
    """Resolve each job over the ``common`` config: its id, its seed (derived from the job when
    it has none; with ``repeat``, one per copy) and its files under ``out``. A job given twice is
    planned once.

    Raises:
        ValueError: ``line N: ...`` for a setting that is unknown, out of range or not a job's
            to change.
    """
    from .config import FLAT_KEYS, load_config

    if repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {repeat}")
    planned: dict[str, Job] = {}
    for line, settings in jobs:
        fixed = [k for k in settings if FLAT_KEYS.get(k, k).startswith(_FIXED)]
        if fixed:
            raise ValueError(f"line {line}: {fixed[0]!r} is the batch's to set, not a job's "
                             "(one model load and one output folder serve the batch)")
        words = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.items()]
        try:
            cfg = load_config(common, overrides=words)
        except ValueError as e:
            raise ValueError(f"line {line}: {e}") from None
        # a job without a seed takes one from its settings, the same on every rerun; copy r of
        # --repeat starts where copy r-1's candidates end
        base = cfg.seed if cfg.seed is not None else int(job_id(cfg)[:8], 16) % 2**30
        for r in range(repeat):
            one = cfg.copy()
            one.seed = base + r * cfg.candidates
            jid = job_id(one)
            one.output.path = str(Path(out) / "img" / f"{jid}.png")
            one.output.overwrite = True  # what a job that died halfway left
            one.output.save_state = False
            one.output.video = None
            planned.setdefault(jid, Job(line, jid, one))
    return list(planned.values())


def shard(jobs: list[Job], spec: str) -> list[Job]:
    """The jobs of share ``i/n`` (i from 0 to n-1), chosen by id, so that the shares of n
    runs are disjoint and cover every job however the file is ordered."""
    i, slash, n = spec.partition("/")
    if not (slash and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise ValueError(f"--shard is i/n with 0 <= i < n, e.g. 0/4, got {spec!r}")
    return [j for j in jobs if int(j.id, 16) % int(n) == int(i)]


def finished(out: str | Path, job_id: str) -> bool:
    return (Path(out) / "meta" / f"{job_id}.json").exists()


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` for runs that share the folder (``--shard``): a lock file
    beside it, held with ``flock`` for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _write_jsonl(path: Path, records: list[dict]) -> None:
    _write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def run_job(gen, job: Job, out: str | Path, worker: str | None = None) -> dict | None:
    """Run one job with a loaded Generator and commit it (``meta/<id>.json``, last); None when
    it was finished already. Returns its record: what the manifest gets."""
    out = Path(out)
    if finished(out, job.id):
        return None
    (out / "img").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = gen.generate(config=job.config)
    record = {"id": job.id, "prompt": job.prompt, "seed": result.seeds[0], "line": job.line,
              "files": [str(Path(f).relative_to(out)) for f in result.files],
              "scores": result.scores, "seconds": round(time.perf_counter() - start, 3),
              "device": str(gen.device), "worker": worker or f"{socket.gethostname()}:{os.getpid()}",
              "finished": time.time()}
    meta = {**record, "config": OmegaConf.to_container(job.config)}
    _write_text(out / "meta" / f"{job.id}.json", json.dumps(meta, indent=1) + "\n")
    return record


def rebuild_manifest(out: str | Path) -> int:
    """Write ``manifest.jsonl`` again from ``meta/`` if the two disagree (or it is missing);
    returns how many jobs are finished."""
    out = Path(out)
    records = []
    for path in sorted((out / "meta").glob("*.json")):
        data = json.loads(path.read_text())
        data.pop("config", None)
        records.append(data)
    records.sort(key=lambda r: r["finished"])
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines() if manifest.exists() else []
    if sorted(json.loads(line)["id"] for line in lines if line.strip()) != sorted(r["id"] for r in records):
        _write_jsonl(manifest, records)
    return len(records)


@dataclass
class BatchReport:
    done: int  # finished by this run
    skipped: int  # finished before it started
    failed: list[dict]


def begin(out: str | Path, jobs: list[Job]) -> tuple[list[Job], BatchReport]:
    """What a run of ``jobs`` has to do: the manifest brought up to date, the last run's
    failures among ``jobs`` cleared (this run retries them), and the jobs not finished."""
    rebuild_manifest(out)
    ids, failed = {j.id for j in jobs}, Path(out) / "failed.jsonl"
    if failed.exists():  # other shards' failures stay listed; this run retries its own
        with _locked(failed):
            kept = [r for r in _read_jsonl(failed)
                    if r["id"] not in ids and not finished(out, r["id"])]
            if kept:
                _write_jsonl(failed, kept)
            else:
                failed.unlink()
    todo = [j for j in jobs if not finished(out, j.id)]
    return todo, BatchReport(0, len(jobs) - len(todo), [])


def record_outcome(out: str | Path, report: BatchReport, job: Job, record: dict | None = None,
                   error: str | None = None, attempts: int = 1) -> None:
    """A job's line in ``manifest.jsonl`` (``record``; None: another run had finished it) or in
    ``failed.jsonl`` (``error``)."""
    out = Path(out)
    if error is not None:
        report.failed.append({"id": job.id, "line": job.line, "prompt": job.prompt,
                              "error": error, "attempts": attempts})
        with _locked(out / "failed.jsonl"), open(out / "failed.jsonl", "a") as f:
            f.write(json.dumps(report.failed[-1]) + "\n")
    elif record is not None:
        with open(out / "manifest.jsonl", "a") as f:  # one short append: never a torn line
            f.write(json.dumps(record) + "\n")
        report.done += 1


def run_jobs(gen, jobs: list[Job], out: str | Path, progress: bool = False) -> BatchReport:
    """Run the unfinished ``jobs`` in this process, one after another, with one loaded
    Generator. A job that fails (NaN loss, out of memory, a bad init image) goes to
    ``failed.jsonl`` and the others go on; Ctrl-C stops after what is written."""
    from tqdm.auto import tqdm

    from .generator import GenerationError

    todo, report = begin(out, jobs)
    for job in tqdm(todo, desc="jobs", unit="job", disable=not progress):
        try:
            record_outcome(out, report, job, run_job(gen, job, out))
        except (GenerationError, ValueError, OSError) as e:
            record_outcome(out, report, job, error=str(e))
    return report
