"""The training runs of a reproduction: the latent data (autoencoder and features, resumable), train.py children
run one or several at a time, resumed from their newest checkpoints, and where each run stands (--status)."""
import contextlib
import dataclasses
import glob
import json
import os
import signal
import string
import subprocess
import sys
import threading
import time

from .plan import LATENT_IMAGE_SIZE, ROOT, Plan, ReproduceError, check_deadline


def _run(cmd: list, what: str) -> None:
    print(f"[{what}] {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise ReproduceError(f"{what} failed (command above); rerun to resume it")


def prepare_latent(work: str, plan: Plan) -> tuple:
    """The latent space: the autoencoder (trained here, resumable), the digits as an ImageFolder, and their
    features -> (data overrides for train.py, the autoencoder's report)."""
    ae, images, features = (os.path.join(work, name) for name in ("autoencoder", "digits64", "features"))
    report_path = os.path.join(ae, "report.json")
    if not os.path.isfile(report_path):
        _run([sys.executable, os.path.join(ROOT, "tools", "train_autoencoder.py"), "--out", ae, "--steps",
              str(plan.ae_steps), "--export-images", images, "--export-limit", str(plan.n_latents),
              "--features", "pixels" if plan.steps < 100 else "auto"],
             "autoencoder")
    record = os.path.join(features, f"imagenet{LATENT_IMAGE_SIZE}_features", "latents.json")
    done = os.path.join(features, f"imagenet{LATENT_IMAGE_SIZE}_features", f"{plan.n_latents - 1}.npy")
    if not (os.path.isfile(record) and os.path.isfile(done)):
        # No flip: a mirrored 2 or 3 is not a digit (Fast-DiT's ImageNet augmentation does not apply here).
        _run([sys.executable, os.path.join(ROOT, "extract_features.py"), "--data-path", images, "--features-path",
              features, "--image-size", str(LATENT_IMAGE_SIZE), "--vae-path", ae, "--flip", "none", "--device", "cpu",
              "--num-workers", "0", "--batch-size", "100"], "features")
    with open(record) as f:
        latents = json.load(f)
    with open(report_path) as f:
        ae_report = json.load(f)
    data = [f"data.feature_path={features}", f"data.vae_path={ae}", f"data.latent_scale={latents['scaling_factor']}",
            f"data.latent_shift={latents['shift_factor']}"]
    return data, dict(ae_report, path=ae, latents=latents)


def final_checkpoint(run_root: str, steps: int):
    found = sorted(glob.glob(os.path.join(run_root, "*", "checkpoints", f"{steps:07d}.pt")))
    return found[-1] if found else None


def max_steps(overrides: list) -> int:
    """The train.max_steps a run's overrides set (the last one wins, as in config.py)."""
    return [int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.max_steps=")][-1]


def newest_checkpoint(run_root: str) -> tuple:
    """-> (step, path) of the newest `checkpoints/NNNNNNN.pt` (train.py's names) in any run folder under run_root;
    (0, None) when there is none."""
    ckpts = glob.glob(os.path.join(run_root, "*", "checkpoints", "[0-9]" * 7 + ".pt"))
    return max((int(os.path.basename(c)[:-3]), c) for c in ckpts) if ckpts else (0, None)


def run_progress(work: str, specs: dict) -> list:
    """Where each run of `specs` stands, from its folder alone (nothing is trained or loaded): one dict per run with
    key, label, step (its newest checkpoint, 0 when none), steps (what the plan trains) and seconds (training_seconds
    so far)."""
    rows = []
    for key, (label, _, overrides) in specs.items():
        step, newest = newest_checkpoint(os.path.join(work, "runs", key))
        run_dir = os.path.dirname(os.path.dirname(newest)) if newest else None
        has_log = run_dir and os.path.isfile(os.path.join(run_dir, "log.txt"))
        seconds = training_seconds(run_dir, upto=step) if has_log else 0.0
        rows.append(dict(key=key, label=label, step=step, steps=max_steps(overrides), seconds=seconds,
                         rate=last_rate(run_dir) if has_log else None))
    return rows


def log_lines(run_dir: str):
    """The messages of a run's log.txt, without train.py's "[time] " prefix (JSON records start with "{")."""
    with open(os.path.join(run_dir, "log.txt")) as f:
        for line in f:
            yield line.split("] ", 1)[-1].strip()


def last_rate(run_dir: str):
    """The steps/s of a run's last logged interval (how fast it trains now, on this machine's current load); None
    before its first log line."""
    rate = None
    for text in log_lines(run_dir):
        if text.startswith("{"):
            rate = json.loads(text).get("steps_per_sec", rate)
    return rate


def print_status(work: str, specs: dict, latent: bool) -> list:
    """--status: the pieces of this invocation, done or how far, in the order a rerun takes them."""
    if latent:
        ae_done = os.path.isfile(os.path.join(work, "autoencoder", "report.json"))
        print(f"autoencoder: {'done' if ae_done else 'to train'}")
    rows = run_progress(work, specs)
    width = max(len(r["label"]) for r in rows)
    for r in rows:
        left = r["steps"] - r["step"]
        state = "done" if left <= 0 else f"{100 * r['step'] / r['steps']:.0f}%"
        eta = f", {left / r['rate'] / 60:.0f} min to go at its last logged {r['rate']:.2f} steps/s" \
            if left > 0 and r["rate"] else ""
        print(f"{r['key']:<9} {r['label']:<{width}}  {r['step']:>6} / {r['steps']:<6} {state:>5}  "
              f"{r['seconds'] / 60:6.1f} min of training logged{eta}")
    scored = glob.glob(os.path.join(work, "scores", "*.npz"))
    print(f"sample sets scored and cached: {len(scored)} (in {os.path.join(work, 'scores')})")
    return rows


def training_seconds(run_dir: str, upto: int = None) -> float:
    """Training time of a run from its log.txt, across the invocations that resumed it: every logged interval is
    (steps since the previous log line or the resume point) / its steps_per_sec, and a step logged again after a
    resume counts once (its latest interval). Start-up, checkpoint writes and steps redone after a kill are left
    out, so runs finished in different sessions compare fairly. `upto`: only the steps up to it (a run's newest
    checkpoint, when steps logged past it by an older, longer attempt are still to be redone)."""
    intervals, prev = {}, 0
    for text in log_lines(run_dir):
        if text.startswith("run folder "):
            prev = 0
        elif text.startswith("resumed from step "):
            prev = int(text.split()[-1])
        elif text.startswith("{"):
            rec = json.loads(text)
            if "step" in rec and rec.get("steps_per_sec"):
                intervals[rec["step"]] = (rec["step"] - prev) / rec["steps_per_sec"]
                prev = rec["step"]
    return float(sum(v for step, v in intervals.items() if upto is None or step <= upto))


@dataclasses.dataclass
class TrainJob:
    """One training run of train_all: its final checkpoint when already trained, else the child training it."""
    key: str
    run_root: str
    steps: int
    command: str                          # what trains it from scratch (the report lists it)
    done: str = None                      # the final checkpoint, once it exists
    proc: subprocess.Popen = None
    log: str = None                       # the child's output, when several train at once


def start_training(key: str, config: str, overrides: list, work: str, threads: int = None) -> TrainJob:
    """Skip a run whose final checkpoint exists, else start train.py on it in a child process (its own Accelerate
    state), resuming from its newest checkpoint. threads: the child's OMP/torch thread count, and its output goes
    to runs/KEY.log (several children at once); None: the machine's default threads, output to this console."""
    run_root = os.path.join(work, "runs", key)
    script = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, config)]
    args = [*overrides, f"train.results_dir={run_root}"]
    command = "python " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in script[1:] + args)
    job = TrainJob(key, run_root, max_steps(overrides), command)
    job.done = final_checkpoint(run_root, job.steps)
    if job.done:
        print(f"[{key}] already trained: {job.done}", flush=True)
        return job
    _, partial = newest_checkpoint(run_root)
    cmd = script + (["--resume", os.path.dirname(os.path.dirname(partial))] if partial else []) + args
    print(f"[{key}] {' '.join(cmd)}", flush=True)
    if threads is None:
        job.proc = subprocess.Popen(cmd, cwd=ROOT)
        return job
    os.makedirs(os.path.dirname(run_root), exist_ok=True)
    job.log = run_root + ".log"
    print(f"[{key}] training on {threads} thread(s); its output: {job.log}", flush=True)
    with open(job.log, "ab") as log:  # the child holds its own descriptor
        job.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    return job


def finish_training(job: TrainJob) -> dict:
    """-> ckpt (the final checkpoint), seconds (training_seconds of the run, wherever and whenever it trained) and
    command, once the job's child (if any) has exited."""
    if job.proc is not None:
        where = f" (its output: {job.log})" if job.log else " (command above)"
        if job.proc.returncode != 0:
            raise ReproduceError(f"training run {job.key!r} failed{where}; rerun to resume it")
        job.done = final_checkpoint(job.run_root, job.steps)
        if job.done is None:
            raise ReproduceError(f"training run {job.key!r} finished without checkpoints/{job.steps:07d}.pt in "
                                 f"{job.run_root}{where}")
    return {"ckpt": job.done, "seconds": training_seconds(os.path.dirname(os.path.dirname(job.done))),
            "command": job.command}


def needs(overrides: list) -> set:
    """The runs whose final checkpoints a run's overrides name ({key})."""
    return {name for o in overrides for _, name, _, _ in string.Formatter().parse(o) if name}


@contextlib.contextmanager
def sigterm_unwinds():
    """While inside: a `kill` of this process (SIGTERM) unwinds the stack as Ctrl-C does, so that train_all stops its
    children rather than leaving them training on, orphaned, beside a rerun that resumes the same runs."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def unwind(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_all(specs: dict, work: str, jobs: int = 1, deadline: float = None) -> dict:
    """Train every run of `specs` (key -> (label, config, overrides)), up to `jobs` at once. A run that starts from
    another's final checkpoint ({key} in its overrides) waits for it; of the runs ready to start, those that others
    wait for go first (so that a free slot does not idle behind them at the end), then specs' order.

    With jobs > 1 each child gets its share of the cores (OMP_NUM_THREADS = cores // jobs, unless set): small models
    use two threads poorly, and children each spinning on every core would wait on each other
    (docs/reproduction.md has the measurement). A failed run stops the others (each resumes from its newest
    checkpoint on a rerun). deadline (a time.monotonic(); None: none): past it TimeBudgetSpent, and the runs
    training get SIGTERM, on which train.py saves the step it is on. -> key -> finish_training's dict."""
    for key, (_, _, overrides) in specs.items():
        missing = needs(overrides) - set(specs)
        if missing:
            raise ReproduceError(f"training run {key!r} starts from {sorted(missing)}, which this invocation does not "
                                 f"train (runs: {list(specs)})")
    if jobs < 1:
        raise ReproduceError(f"--jobs must be >= 1, got {jobs}")
    threads = None
    if jobs > 1:
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // jobs))
    trained, running, pending = {}, {}, list(specs)
    with sigterm_unwinds():
        try:
            _schedule(specs, work, jobs, threads, trained, running, pending, deadline)
        finally:
            for job in running.values():  # a failure, Ctrl-C, kill or the deadline: each saves its step, stops
                job.proc.terminate()
                job.proc.wait()
    return {k: trained[k] for k in specs}


def _schedule(specs: dict, work: str, jobs: int, threads, trained: dict, running: dict, pending: list,
              deadline: float = None) -> None:
    """train_all's loop: start what is ready while slots are free, collect what exited (running holds the children
    for train_all to stop)."""
    while pending or running:
        check_deadline(deadline, f"training runs {sorted(running) + pending} finished")
        awaited = {k for p in pending for k in needs(specs[p][2])}
        ready = sorted((k for k in pending if needs(specs[k][2]) <= set(trained)), key=lambda k: k not in awaited)
        if not ready and not running:
            raise ReproduceError(f"training runs {pending} start from each other's checkpoints")
        for key in ready:
            if len(running) >= jobs:
                break
            pending.remove(key)
            _, config, overrides = specs[key]
            job = start_training(key, config, [o.format(**{k: v["ckpt"] for k, v in trained.items()})
                                               for o in overrides], work, threads)
            if job.proc is None:
                trained[key] = finish_training(job)
            else:
                running[key] = job
        if not running:  # everything left waits on runs trained above: start them
            continue
        exited = [k for k, j in running.items() if j.proc.poll() is not None]
        if not exited:
            time.sleep(1.0)
        for key in exited:
            trained[key] = finish_training(running.pop(key))
            if jobs > 1:
                print(f"[{key}] trained: {trained[key]['ckpt']}", flush=True)
