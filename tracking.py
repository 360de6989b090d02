"""Where a training run reports besides log.txt, and its profiler: W&B and TensorBoard sinks, torch.profiler.

`Tracker` sends the same scalars and images to every sink the config's `logging` section turns on. A resumed
run continues its W&B run: the id is kept in each checkpoint and handed back on `--resume` (unless
logging.resume_wandb is false), so the curves of one run stay one run across restarts. W&B's offline mode
needs no account; TensorBoard needs no service at all.
"""
import os
from contextlib import nullcontext
from typing import Dict, Optional

import numpy as np
import torch


class TrackingError(RuntimeError):
    user_error = True  # printed as one line by config.main_guard


class Tracker:
    """Scalars and images to W&B and/or TensorBoard on the main process; a no-op elsewhere or when both are off."""

    def __init__(self, cfg, run_dir: str, is_main: bool, resume_id: Optional[str] = None):
        lg = cfg.logging
        self.wandb_run, self.writer = None, None
        if not is_main:
            return
        if lg.wandb != "disabled":
            import wandb
            from config import config_to_dict
            resume = resume_id if lg.resume_wandb else None
            self.wandb_run = wandb.init(project=lg.project, entity=lg.entity or None,
                                        name=lg.run_name or os.path.basename(run_dir), tags=list(lg.tags) or None,
                                        dir=run_dir, mode=lg.wandb, config=config_to_dict(cfg), id=resume,
                                        resume="allow" if resume else None)
        if lg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrackingError("logging.tensorboard=true needs the tensorboard package (pip install tensorboard), "
                                    "which this environment lacks") from None
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    @property
    def wandb_id(self) -> Optional[str]:
        """The W&B run id, stored in checkpoints so that --resume continues this run."""
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def log_images(self, paths: Dict[str, str], step: int) -> None:
        """PNG files already written to the run folder, under their names."""
        if self.wandb_run is None and self.writer is None:
            return
        from PIL import Image
        for name, path in paths.items():
            if self.wandb_run is not None:
                import wandb
                self.wandb_run.log({name: wandb.Image(path)}, step=step)
            if self.writer is not None:
                self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.writer is not None:
            self.writer.close()


def step_profiler(first: int, last: int, out_dir: str, worker: Optional[str] = None, start: int = 0,
                  warmup: int = 0, cuda: Optional[bool] = None):
    """A torch.profiler recording steps first..last (1-based, counted from `start` + 1; call .step() after each)
    on the CPU and, when there is one (or cuda=True), the GPU, written by TensorBoard's trace handler to out_dir
    as one *.pt.trace.json per worker once `last` ends. `warmup` steps before `first` run under the profiler
    unrecorded (its own start-up cost stays out of the trace).

    Used by train.py (train.profile_steps) and sample.py (--profile). Steps before `start` (a resumed run) are
    not recorded; with nothing left to record this is a no-op. Open the trace with `tensorboard --logdir OUT_DIR`
    (profiler plugin) or in Perfetto / chrome://tracing.
    """
    if last <= start or last < first:
        return nullcontext(_NoProfiler())
    begin = max(first - 1, start)  # steps already done when recording starts
    warm = min(warmup, begin - start)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available() if cuda is None else cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(skip_first=begin - start - warm, wait=0, warmup=warm, active=last - begin,
                                       repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=True,
                                  on_trace_ready=torch.profiler.tensorboard_trace_handler(out_dir, worker_name=worker))


class _NoProfiler:
    def step(self) -> None:
        pass
