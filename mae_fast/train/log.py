"""What a run shows: printed lines (rank 0), log.csv, TensorBoard, a tqdm bar per epoch."""
import csv
import os
import sys


class CsvLog:
    """log.csv with one row of ``fields`` per write; on resume, rows past the checkpoint go."""
    FIELDS = ("epoch", "step", "loss", "lr", "img_per_s")

    def __init__(self, path: str, resume_step=None, fields=FIELDS):
        self.path = path
        self.fields = tuple(fields)
        rows = []
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < resume_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.fields, restval="", extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, **row):
        self.writer.writerow(row)
        self.file.flush()

    def close(self):
        self.file.close()


def tensorboard_writer(log_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(log_dir=log_dir)


def progress_bar(total, initial, desc, disable):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # in a log file (no terminal) a bar line every 30 s, not one per update
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
                leave=False, file=sys.stderr, mininterval=0.1 if interactive else 30.0)


class RunLog:
    """Printed lines, log.csv and TensorBoard of a run; everything but ``say`` on rank 0 is a no-op
    on the other ranks."""

    def __init__(self, output_dir: str, is_main: bool, resume_step=None, fields=CsvLog.FIELDS):
        self.is_main = is_main
        self.csv = CsvLog(os.path.join(output_dir, "log.csv"), resume_step, fields) if is_main else None
        self.tb = tensorboard_writer(os.path.join(output_dir, "tensorboard")) if is_main else None
        if is_main and self.tb is None:
            self.say("(tensorboard not installed: logging to log.csv only)")

    def say(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def row(self, step: int, scalars: dict, **row) -> None:
        """One log.csv row (``row``) and the TensorBoard ``scalars`` at ``step``."""
        if self.csv is not None:
            self.csv.write(step=step, **row)
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.csv is not None:
            self.csv.close()
        if self.tb is not None:
            self.tb.close()
