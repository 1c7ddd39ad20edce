"""backend=slurm: the workers are the tasks of one `sbatch --array` job; each runs the sweep
command as a local worker does (n_jobs=1), against the shared storage. This process watches the
queue and does the end.

Submitted with sbatch itself, not submitit: the script is a file a person can read and submit
again, and array, requeue and signal options are sbatch's own. (Without slurmdbd, submitit's
result() never returns for a job cancelled with scancel.) Slurm keeps no exit status without
its accounting database: each task writes its workers' exit statuses to a file beside its
output, and a task that leaves the queue without that file, or with a status other than 0,
lost its workers. The stores' URLs and any password reach the tasks through the environment
that sbatch exports, never the script or a command line.

Time limits and preemption: the tasks are submitted with --requeue and --signal=B:USR1@lead.
The task's shell hands USR1 on to its workers, which stop their trials at the next epoch (the
trial fails as interrupted, with its checkpoint, and is continued by whichever worker asks next)
and exit 75; this process then submits a fresh task in its place. A worker also starts no trial
that would not end before the signal, judged as the time budget judges. A requeued task
(preemption, `scontrol requeue`) gets SIGTERM, its workers close their trials as on scancel, and
the task rejoins the sweep when Slurm starts it again: it stays in the queue, and is not replaced.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_study_sweeper import contract
from mlflow_study_sweeper.backends.local import Replacements, worker_command
from mlflow_study_sweeper.errors import SweepConfigError, SweepError, mask_url

DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
# an Optuna storage and a tracking store that every node reaches (not a file on this machine)
SHARED_STORAGE = ("postgresql", "mysql")
JOURNAL = (".journal", ".log")  # a journal file (Optuna's JournalFileBackend) in a shared folder
# the states of a task whose processes run (or are ending); any other, or none, is a task gone
TASK_ALIVE = ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING")
SHARED_TRACKING = ("http://", "https://", "postgresql", "mysql", "mssql", "databricks")
OPTION = re.compile(r"[a-z][a-z0-9-]*")  # an sbatch long option's name, without its dashes
QUEUE_POLL_S = 2.0  # squeue at most this often: the controller answers every user's queries
STOP_WAIT_S = 90  # after scancel: Slurm's KillWait (30 s by default) and the workers' own ends


class SlurmUnreachable(SweepError):
    """squeue or sbatch stopped answering under the sweep."""

    exit_code = 1


@dataclass(frozen=True)
class SlurmSettings:
    """hydra.sweeper.slurm and the resources of backend=slurm, checked."""

    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # further sbatch options
    setup: tuple[str, ...] = ()  # lines run before the workers (module load, a venv)
    signal_lead: int = 300  # seconds before the time limit at which the workers are told
    detach: bool = False  # the command exits after submitting; the tasks' workers end the sweep


TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def time_limit_seconds(value: str) -> int | None:
    """sbatch's --time in seconds: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes, days-hours:minutes:seconds; None for unlimited; ValueError otherwise."""
    text = value.strip().lower()
    if text in ("-1", "infinite", "unlimited"):
        return None
    match = TIME.fullmatch(text)
    if match is None:
        raise ValueError(value)
    days, a, b, c = match.groups()
    if days is None:
        parts = [int(x) for x in (a, b, c) if x is not None]
        if len(parts) == 1:  # minutes
            return parts[0] * 60
        if len(parts) == 2:  # minutes:seconds
            return parts[0] * 60 + parts[1]
        return parts[0] * 3600 + parts[1] * 60 + parts[2]
    hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
    return int(days) * 86400 + hours * 3600 + minutes * 60 + seconds


def check_time_limit(settings: SlurmSettings) -> None:
    """The signal's lead fits in the time limit, with room for a trial before it."""
    lead = settings.signal_lead
    if settings.time is None:
        return
    try:
        limit = time_limit_seconds(settings.time)
    except ValueError:
        raise SweepConfigError(
            f"hydra.sweeper.slurm.time={settings.time!r} is not a Slurm time limit: write it as "
            f"sbatch does (minutes, hours:minutes:seconds, days-hours:minutes:seconds)"
        ) from None
    if limit is not None and limit <= lead:
        raise SweepConfigError(
            f"hydra.sweeper.slurm.time={settings.time} ({limit} s) is not longer than "
            f"hydra.sweeper.slurm.signal_lead={lead} s, when the workers are told to stop: "
            f"raise the time limit, or lower the lead (it must still exceed an epoch)"
        )


@dataclass(frozen=True)
class Layout:
    """How n_jobs workers are packed into array tasks: a GPU share below 1 puts floor(1/share)
    workers in one task, on its one GPU."""

    tasks: int
    per_task: int
    cpus_per_task: int
    gpus_per_task: int
    threads: int  # each worker's OMP_NUM_THREADS

    @classmethod
    def of(cls, n_jobs: int, cpu: float | None, gpu: float | None) -> Layout:
        cpu, gpu = cpu or 1, gpu or 0
        per_task = math.floor(1 / gpu + 1e-9) if 0 < gpu < 1 else 1
        per_task = min(per_task, n_jobs)
        if gpu >= 1 and gpu != int(gpu):
            raise SweepConfigError(
                f"hydra.sweeper.resources.gpu={gpu:g}: on Slurm a worker takes a share below 1 "
                f"(several workers in one task, on its GPU) or whole GPUs"
            )
        return cls(
            tasks=math.ceil(n_jobs / per_task),
            per_task=per_task,
            cpus_per_task=max(1, math.ceil(cpu * per_task - 1e-9)),
            gpus_per_task=math.ceil(gpu),
            threads=max(1, int(cpu)),
        )

    def workers_in(self, n_jobs: int, index: int) -> int:
        return min(self.per_task, n_jobs - index * self.per_task)


def run(*command: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 1, "", f"{command[0]}: no answer in 60 s")


def check_tools() -> None:
    """Before anything is created: Slurm's commands and its configuration are here."""
    if shutil.which("sbatch") is None:
        raise SweepConfigError(
            "hydra.sweeper.backend=slurm submits its workers with sbatch, which is not on the "
            "PATH: run the sweep on a Slurm login node (or load Slurm's module first)"
        )
    conf = os.environ.get("SLURM_CONF")
    if not (Path(conf).is_file() if conf else DEFAULT_CONF.is_file()):
        where = f"SLURM_CONF={conf} is not a file" if conf else f"{DEFAULT_CONF} does not exist"
        raise SweepConfigError(
            f"hydra.sweeper.backend=slurm needs Slurm's configuration, and {where}: export "
            f"SLURM_CONF=/path/to/slurm.conf"
        )


def check_stores(storage: str | None, tracking_uri: str) -> None:
    """Stores that every node reaches: a database server or a journal file (in a folder every
    node mounts: that is the user's to know); not SQLite (a shared filesystem corrupts it, optuna
    #815), not memory."""
    if not storage or not (storage.startswith(SHARED_STORAGE) or storage.endswith(JOURNAL)):
        raise SweepConfigError(
            f"hydra.sweeper.storage={mask_url(storage) if storage else None} is not reachable "
            f"from Slurm's nodes (a SQLite file, which a shared filesystem corrupts, or memory): "
            f"use postgresql://... (a database server every node reaches) or a journal file in "
            f"a folder every node mounts (/shared/sweeps/optuna.journal)"
        )
    if not tracking_uri.startswith(SHARED_TRACKING):
        raise SweepConfigError(
            f"hydra.sweeper.tracking_uri={mask_url(tracking_uri)} is not reachable from Slurm's "
            f"nodes: use http://host:5000 (an mlflow server) or postgresql://..."
        )


def tasks_alive() -> set[str] | None:
    """This user's Slurm tasks whose processes run, as JOB_INDEX (or JOB); None: no answer."""
    out = run("squeue", "-h", "-r", "--me", "-o", "%i|%T")
    if out.returncode != 0:
        return None
    alive = set()
    for line in out.stdout.splitlines():
        task, _, state = line.partition("|")
        if state in TASK_ALIVE:
            alive.add(task)
    return alive


def check_partition(settings: SlurmSettings, layout: Layout) -> None:
    """The partition exists and one of its nodes holds a task's CPUs and GPUs (sinfo)."""
    out = run("sinfo", "-h", "-N", "-o", "%P|%N|%c|%G")
    if out.returncode != 0:
        raise SweepConfigError(
            f"hydra.sweeper.backend=slurm: sinfo failed ({first_line(out.stderr)}): is "
            f"slurmctld running, and SLURM_CONF right?"
        )
    nodes: dict[str, list[tuple[int, int]]] = {}
    default = None
    for line in out.stdout.splitlines():
        part, _node, cpus, gres = line.split("|")
        if part.endswith("*"):
            part = default = part[:-1]
        nodes.setdefault(part, []).append((int(cpus.rstrip("+")), gpu_count(gres)))
    name = settings.partition or default
    if name not in nodes:
        what = f"partition {name!r}" if name else "a default partition"
        raise SweepConfigError(
            f"hydra.sweeper.slurm.partition: Slurm has no {what}; its partitions: "
            f"{', '.join(sorted(nodes)) or 'none'}"
        )
    fits = [n for n in nodes[name] if n[0] >= layout.cpus_per_task and n[1] >= layout.gpus_per_task]
    if not fits:
        cpus, gpus = max(nodes[name], key=lambda n: (n[1], n[0]))
        raise SweepConfigError(
            f"hydra.sweeper.resources: a task needs {layout.cpus_per_task} CPUs and "
            f"{layout.gpus_per_task} GPUs ({layout.per_task} worker(s) each), and no node of "
            f"partition {name!r} has them (the largest: {cpus} CPUs, {gpus} GPUs): lower them"
        )


def directives(settings: SlurmSettings, layout: Layout, name: str, folder: Path) -> list[str]:
    """The script's #SBATCH lines: the array, a task's resources, the settings' options."""
    options = {
        "job-name": name,
        "array": f"0-{layout.tasks - 1}",
        "cpus-per-task": str(layout.cpus_per_task),
        "output": str(folder / "%A_%a.out"),
        "open-mode": "append",  # a requeued task's output follows its first run's
        # preemption or `scontrol requeue` puts the task back in the queue; the signal tells its
        # workers, through the task's shell (B:), that its time limit is near
        "requeue": "",
        "signal": f"B:USR1@{settings.signal_lead}",
    }
    if layout.gpus_per_task:
        options["gres"] = f"gpu:{layout.gpus_per_task}"
    for key in ("partition", "time", "account", "qos"):
        if getattr(settings, key) is not None:
            options[key] = str(getattr(settings, key))
    options |= settings.options
    return [f"#SBATCH --{k}={v}" if v != "" else f"#SBATCH --{k}" for k, v in options.items()]


def check_submission(settings: SlurmSettings, layout: Layout, name: str, folder: Path) -> None:
    """sbatch --test-only with the workers' options (time, account, qos, the rest): Slurm
    itself says what it refuses, and submits nothing."""
    lines = directives(settings, layout, name, folder)
    script = "\n".join(["#!/bin/bash", *lines, "true", ""])
    try:
        out = subprocess.run(
            ["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        out = subprocess.CompletedProcess([], 1, "", "sbatch: no answer in 60 s")
    if out.returncode != 0:
        raise SweepConfigError(
            f"hydra.sweeper.slurm: sbatch refuses the workers' options "
            f"({first_line(out.stderr)}); they are: "
            + " ".join(line.removeprefix("#SBATCH ") for line in lines)
        )


def expand(indexes: str) -> list[int]:
    """sbatch's --array value (0-3, or 2) as the indexes."""
    first, _, last = indexes.partition("-")
    return list(range(int(first), int(last or first) + 1))


def gpu_count(gres: str) -> int:
    """GPUs in sinfo's %G: gpu:2, gpu:a100:4(S:0-1), several comma-separated; (null): 0."""
    return sum(int(m.group(1)) for m in re.finditer(r"\bgpu(?::[^:,(]+)?:(\d+)", gres))


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else "no output"


@dataclass
class Task:
    """One array task of this sweep: JOB_INDEX in squeue."""

    job: str
    index: int
    seen: bool = False  # squeue listed it once

    @property
    def id(self) -> str:
        return f"{self.job}_{self.index}"


class SlurmWorkers:
    """n_jobs workers as the tasks of an array job; a lost task is reported and, while work is
    left, submitted again."""

    def __init__(
        self,
        n_jobs: int,
        cpu: float | None,
        gpu: float | None,
        settings: SlurmSettings,
        folder: Path,
        start_dir: Path,
        name: str,
        on_death: Callable[[dict[str, str] | None, str], tuple[bool, bool]],
    ) -> None:
        self.n_jobs = n_jobs
        self.layout = Layout.of(n_jobs, cpu, gpu)
        self.settings = settings
        self.folder = folder  # the script, each task's output and exit statuses
        self.start_dir = start_dir
        self.name = name
        self.on_death = on_death  # ({"slurm": JOB_INDEX}, why) -> (work left, it trained)
        self.tasks: list[Task] = []
        self.replacements = Replacements()
        self.last_look = 0.0
        self.script = folder / "workers.sbatch"

    # ---- the script ------------------------------------------------------------------------

    def command(self) -> tuple[list[str], dict[str, str]]:
        argv = [str(Path(sys.argv[0]).resolve()), *sys.argv[1:]]
        extra = [  # the stores as this process resolved them, through the environment
            "hydra.sweeper.storage=${oc.env:SWEEP_STORAGE_URL}",
            "hydra.sweeper.tracking_uri=${oc.env:MLFLOW_TRACKING_URI}",
        ]
        return worker_command(argv, extra)

    def write_script(self) -> dict[str, str]:
        """The batch script (no password in it); the variables only the environment carries."""
        command, env = self.command()
        secrets = {k: v for k, v in env.items() if k != contract.WORKER}
        python = shlex.join([sys.executable, *command])
        lay = self.layout
        lines = [
            "#!/bin/bash",
            f"# the workers of sweep {self.name!r} (hydra-mlflow-study-sweeper, backend=slurm).",
            "# Submit again with `sbatch --array=I` from a shell that exports the sweep's",
            "# stores (SWEEP_STORAGE_URL, MLFLOW_TRACKING_URI and their passwords' variables).",
            *directives(self.settings, self.layout, self.name, self.folder),
            *self.settings.setup,
            f"cd {shlex.quote(str(self.start_dir))}",
            # detached, the workers are peers: each runs the sweep as its own command, and the
            # last to finish does the end (the end's claim makes it once)
            (
                f"export OMP_NUM_THREADS={lay.threads}"
                if self.settings.detach
                else f"export {contract.WORKER}=1 OMP_NUM_THREADS={lay.threads}"
            ),
            f'export {contract.SLURM_TASK}="${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"',
            f'task="${contract.SLURM_TASK}"',
            f'rm -f {shlex.quote(str(self.folder))}/"$task".exit  # a requeued run\'s earlier one',
            "# when the workers stop: the job's end (squeue) less the signal's lead",
            'end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null)',
            'end=$(date -d "$end" +%s 2>/dev/null) &&'
            f" export {contract.JOB_STOP_AT}=$(( end - {self.settings.signal_lead} ))",
            "# the time limit's signal, handed on to every worker: each stops at its next epoch",
            "# (ignored until they run: a worker sets its own handler as it starts)",
            "trap '' USR1",
            "pids=()",
            f"workers=$(( {self.n_jobs} - SLURM_ARRAY_TASK_ID * {lay.per_task} ))",
            f"(( workers > {lay.per_task} )) && workers={lay.per_task}",
            'echo "task $task on $(hostname): $workers worker(s),'
            ' CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-}"',
            "for ((i = 0; i < workers; i++)); do",
            f"  {python} &",
            "  pids+=($!)",
            "done",
            """trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1""",
            "# scancel's SIGTERM reaches every worker; the shell waits for their ends",
            "trap '' TERM",
            "codes=()",
            "# a signal handed on interrupts wait (128+): wait again while the worker lives",
            'for pid in "${pids[@]}"; do',
            '  while wait "$pid"; code=$?;'
            ' (( code > 128 )) && kill -0 "$pid" 2>/dev/null; do :; done',
            "  codes+=($code)",
            "done",
            f'echo "${{codes[*]}}" > {shlex.quote(str(self.folder))}/"$task".exit',
        ]
        if self.settings.detach:  # no command watches: a task that left submits its successor
            lines += [
                f'if [[ " ${{codes[*]}} " == *" {contract.LEFT_FOR_TIME_LIMIT} "* ]]; then',
                f'  sbatch --array="$SLURM_ARRAY_TASK_ID" {shlex.quote(str(self.script))}',
                "fi",
            ]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.script.write_text("\n".join(lines) + "\n")
        return secrets

    # ---- submitting and watching -----------------------------------------------------------

    def submit(self, indexes: str) -> str:
        env = {**os.environ, **self.secrets}
        out = subprocess.run(
            ["sbatch", "--parsable", f"--array={indexes}", str(self.script)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        if out.returncode != 0:
            raise SlurmUnreachable(
                f"sbatch refused the workers ({first_line(out.stderr)}); the script is "
                f"{self.script}. Finished trials are kept: rerun the command to resume"
            )
        job = out.stdout.strip().split(";")[0]
        for index in expand(indexes):  # a cluster started afresh numbers its jobs from 1 again
            self.exit_file(Task(job, index)).unlink(missing_ok=True)
        return job

    def start(self) -> str:
        self.secrets = self.write_script()
        job = self.submit(f"0-{self.layout.tasks - 1}")
        self.tasks = [Task(job, i) for i in range(self.layout.tasks)]
        print(
            f"Submitted {self.layout.tasks} Slurm task(s) of {self.layout.per_task} worker(s) "
            f"each as job {job} ({self.script}; output in {self.folder}/{job}_<task>.out)",
            flush=True,
        )
        return job

    def running(self) -> list[str]:
        """This sweep's tasks already in the queue (a detached sweep still training)."""
        out = run("squeue", "-h", "-r", "--me", f"--name={self.name}", "-o", "%i")
        return out.stdout.split() if out.returncode == 0 else []

    def queue(self) -> dict[str, tuple[str, str]] | None:
        """This user's tasks in the queue: JOB_INDEX -> (state, node); None: no answer."""
        out = run("squeue", "-h", "-r", "--me", "-o", "%i|%T|%N")
        if out.returncode != 0:
            return None
        listed = {}
        for line in out.stdout.splitlines():
            task, state, node = (line.split("|") + ["", ""])[:3]
            listed[task] = (state, node)
        return listed

    def poll(self) -> None:
        """What changed since the last look: tasks started, finished, lost."""
        if time.monotonic() - self.last_look < QUEUE_POLL_S:
            return
        self.last_look = time.monotonic()
        listed = self.queue()
        if listed is None:
            return  # the controller is busy or restarting: look again later
        for task in list(self.tasks):
            state, node = listed.get(task.id, ("", ""))
            if state and state != "COMPLETED":
                # COMPLETING too: a requeued task passes through it back to PENDING
                if state == "RUNNING" and not task.seen:
                    task.seen = True
                    print(f"Slurm task {task.id} runs on {node}", flush=True)
                elif state in ("PENDING", "REQUEUED", "REQUEUE_HOLD") and task.seen:
                    task.seen = False
                    again = "it rejoins when it runs again"
                    print(f"Slurm task {task.id} was requeued: {again}", flush=True)
                continue
            self.tasks.remove(task)
            self.ended(task)

    def exit_file(self, task: Task) -> Path:
        return self.folder / f"{task.id}.exit"

    def ended(self, task: Task) -> None:
        """A task left the queue: done, or lost with its workers' trials."""
        try:
            codes = [int(c) for c in self.exit_file(task).read_text().split()]
        except (OSError, ValueError):
            codes = None
        if codes is not None and all(c == 0 for c in codes):
            return
        left = codes is not None and all(c in (0, contract.LEFT_FOR_TIME_LIMIT) for c in codes)
        if left:  # they stopped for its time limit: trials continue in a fresh task
            work_left, trained = self.on_death(
                {"slurm": task.id}, f"its Slurm task {task.id} ended"
            )
            if work_left and not trained:  # a fresh task would leave as this one did
                print(
                    f"Slurm task {task.id} left before its time limit without training a trial: "
                    f"a trial, judged by those so far, would not end before the limit less "
                    f"hydra.sweeper.slurm.signal_lead={self.settings.signal_lead} s. It is not "
                    f"replaced: raise hydra.sweeper.slurm.time and rerun to resume",
                    file=sys.stderr,
                    flush=True,
                )
                return
            print(
                f"Slurm task {task.id} left before its time limit"
                + (": a fresh task takes its place" if work_left else ""),
                flush=True,
            )
            if work_left:
                self.resubmit(task)
            return
        if codes is None:
            why = "it left the queue before its workers ended (scancel, a lost node, a time limit)"
        else:
            why = f"its worker(s) exited with {' '.join(map(str, codes))}"
        print(f"Slurm task {task.id} is lost: {why}", file=sys.stderr, flush=True)
        work_left, trained = self.on_death(
            {"slurm": task.id}, f"its Slurm task {task.id} ended: {why}"
        )
        killed = codes is None or any(c >= 128 for c in codes)
        if self.replacements.replace(task.index, work_left, trained, killed):
            self.resubmit(task)

    def resubmit(self, task: Task) -> None:
        job = self.submit(str(task.index))
        self.tasks.append(Task(job, task.index))
        print(f"Slurm task {job}_{task.index} replaces it", flush=True)

    def alive(self) -> bool:
        return bool(self.tasks)

    def wait(self, poll_s: float = 0.5) -> None:
        """Until every task has left the queue (the study is done): one still waiting for a node
        has nothing left to train, and is cancelled rather than waited for."""
        listed = self.queue() or {}
        pending = [t for t in self.tasks if listed.get(t.id, ("", ""))[0] == "PENDING"]
        if pending:
            run("scancel", *[t.id for t in pending])
            self.tasks = [t for t in self.tasks if t not in pending]
        while self.alive():
            self.poll()
            time.sleep(poll_s)

    def stop(self) -> None:
        """scancel every task: its workers close their own trials (SIGTERM); the trials of one
        killed before it could are failed here once it left the queue."""
        jobs = sorted({t.job for t in self.tasks})
        if not jobs:
            return
        run("scancel", *jobs)
        deadline = time.monotonic() + STOP_WAIT_S
        while self.tasks and time.monotonic() < deadline:
            listed = self.queue()
            if listed is not None:
                for task in [t for t in self.tasks if t.id not in listed]:
                    self.tasks.remove(task)
                    self.on_death({"slurm": task.id}, f"its Slurm task {task.id} was cancelled")
            time.sleep(0.5)
        self.tasks = []
