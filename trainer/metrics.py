"""Where training metrics go: a tqdm bar (rank 0), a JSON-lines file for plots and checks, and wandb."""
import json
import os


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
            import wandb  # imported only when asked for: it is slow to import

            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, id=wandb_id,
                                    resume="allow")
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
