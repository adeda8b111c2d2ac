"""Where training metrics go: a JSON-lines file for plots and checks, wandb, and what a person watching sees
(a tqdm bar, or with --no_progress a log line every --log_interval steps with the ETA)."""
import json
import os
import sys
import time


def start_wandb(project, run_name, config, run_id):
    """wandb.init, resuming run `run_id` if given. With no API key set up (and no WANDB_MODE chosen) wandb
    would stop the run with a UsageError: log offline instead, and say so in one line."""
    import wandb  # imported only when asked for: it is slow to import

    kwargs = dict(project=project, name=run_name, config=config, id=run_id, resume="allow")
    try:
        return wandb.init(**kwargs)
    except wandb.errors.UsageError as e:
        if "api key" not in str(e).lower() or os.environ.get("WANDB_MODE"):
            raise
    print("wandb: no API key is set up (`wandb login`, or WANDB_API_KEY): logging offline to ./wandb; "
          "upload later with `wandb sync wandb/offline-run-*`", file=sys.stderr, flush=True)
    return wandb.init(mode="offline", **kwargs)


class MetricsLogger:
    """Rank 0 writes `{out_dir}/{name}_log.jsonl`, one line per logged step, and mirrors it to wandb.

    On resume the log is cut back to the steps before the resume point, so the file always describes one
    continuous run."""

    def __init__(self, path, is_main, use_wandb=False, wandb_project=None, run_name=None, config=None,
                 wandb_id=None, start_step=0):
        self.path, self.is_main, self.wandb = path, is_main, None
        self.wandb_id = wandb_id
        if not is_main:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = []
        if start_step > 0 and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if json.loads(line).get("step", 0) < start_step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
        if use_wandb:
            self.wandb = start_wandb(wandb_project, run_name, config, wandb_id)
            self.wandb_id = self.wandb.id

    def log(self, record):
        if not self.is_main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def clock(seconds):
    """12.3 -> '0:12', 3725 -> '1:02:05'."""
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainingProgress:
    """Rank 0's view of the run: a tqdm bar, or (no_bar) one line per logged step:

        pretrain  step 120/700 (17%)  loss 4.1234  lr 1.98e-03  12,480 tok/s  0:41 elapsed, ETA 3:17

    The ETA is measured from the steps of THIS process (a resumed run does not count the earlier ones).
    `shown`: the stage's own metrics to show after the loss (e.g. a reward model's accuracy)."""

    def __init__(self, name, total_steps, start_step, is_main, no_bar, decimals=4, shown=()):
        self.name, self.total, self.start, self.decimals, self.shown = name, total_steps, start_step, decimals, shown
        self.is_main, self.bar = is_main, None
        self.t0 = time.time()
        if is_main and not no_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc=name, dynamic_ncols=True)

    def step(self, done, record=None):
        """`done` optimizer steps are finished; `record` is the log record when this step was logged."""
        if not self.is_main:
            return
        if self.bar is not None:
            if record is not None:
                extra = {k: f"{record[k]:.{self.decimals}f}" for k in self.shown if k in record}
                self.bar.set_postfix(loss=f"{record['loss']:.{self.decimals}f}", **extra, lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
            self.bar.update(done - self.bar.n)
        elif record is not None:
            elapsed = time.time() - self.t0
            eta = elapsed / max(done - self.start, 1) * (self.total - done)
            extra = "".join(f"{k} {record[k]:.{self.decimals}f}  " for k in self.shown if k in record)
            print(f"{self.name}  step {done}/{self.total} ({100 * done / self.total:.0f}%)  "
                  f"loss {record['loss']:.{self.decimals}f}  {extra}lr {record['lr']:.2e}  "
                  f"{record['tokens_per_s']:,.0f} tok/s  {clock(elapsed)} elapsed, ETA {clock(eta)}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
