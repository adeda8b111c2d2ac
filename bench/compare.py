"""The same throughput benchmark on two git revisions, side by side on this machine. Figures, not a test.

    python bench/compare.py main                       # main vs the working tree (uncommitted changes included)
    python bench/compare.py HEAD~3 HEAD --dim 128 --n_layers 4 --max_seq_len 256 --batch_size 16 --steps 20
    python bench/compare.py main --rounds 5 -- --compile      # anything after -- goes to train_throughput.py
    python bench/compare.py HEAD HEAD --head_flags="--dtype bfloat16"    # one revision, two settings

Every speed claim of this project is a ratio measured this way: one machine, one invocation, the two versions
run in turns (A, B, A, B, ...) so that a busy neighbour or a warm-up slows both alike, and the median of the
rounds is reported. Each revision is checked out with `git worktree add --detach` into a temporary folder
(removed afterwards) and runs its own bench/train_throughput.py with the same flags; WORKTREE means the files
as they are in this checkout. --base_flags / --head_flags go to one side only: a setting (precision, compile)
compared on one revision, or an old revision's default against a new one's option.
"""
import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKTREE = "WORKTREE"
# The model flags both revisions' train_throughput.py understand; the demo shape by default.
SHAPE_FLAGS = ("dim", "n_layers", "max_seq_len", "batch_size", "steps", "warmup_steps")


def git(*args, cwd=ROOT):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def checkout(rev, tmp):
    """A folder holding `rev`'s files, and a label naming the exact commit."""
    if rev == WORKTREE:
        dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
        return ROOT, f"working tree ({git('rev-parse', '--short', 'HEAD')}{dirty})"
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = os.path.join(tmp, sha[:12])
    if not os.path.isdir(path):
        git("worktree", "add", "--detach", path, sha)
    return path, f"{rev} ({sha[:7]})"


def flag_list(text):
    """--base_flags / --head_flags: a shell-quoted string of flags -> their list (a bad quote is one line)."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}; quote it as a shell would") from None


def tokens_per_s(folder, bench_args):
    """Run one revision's benchmark once; its 'throughput  N tokens/s' line."""
    script = os.path.join(folder, "bench", "train_throughput.py")
    if not os.path.isfile(script):
        raise SystemExit(f"{folder} has no bench/train_throughput.py: pick a newer revision")
    out = subprocess.run([sys.executable, script, *bench_args], cwd=folder, capture_output=True, text=True)
    match = re.search(r"throughput\s+([\d,]+) tokens/s", out.stdout)
    if out.returncode or not match:
        raise SystemExit(f"the benchmark failed in {folder}:\n{out.stderr[-2000:] or out.stdout[-2000:]}")
    return float(match.group(1).replace(",", ""))


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="the revision to compare against (a branch, tag or commit)")
    ap.add_argument("head", nargs="?", default=WORKTREE, help=f"the new revision (default: {WORKTREE})")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each revision, in turns")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--max_seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup_steps", type=int, default=2)
    ap.add_argument("--base_flags", default="", type=flag_list,
                    help="more train_throughput.py flags for the base side only; write it with = "
                         "(--base_flags=--compile), or argparse takes the value for a flag of its own")
    ap.add_argument("--head_flags", default="", type=flag_list,
                    help="the same for the head side (--head_flags=\"--dtype bfloat16\")")
    args = ap.parse_args(argv)
    bench_args = [f"--{k}={getattr(args, k)}" for k in SHAPE_FLAGS] + extra

    with tempfile.TemporaryDirectory(prefix="tinymind-compare-") as tmp:
        try:
            sides = []
            for rev, flags in ((args.base, args.base_flags), (args.head, args.head_flags)):
                folder, label = checkout(rev, tmp)
                sides.append((folder, label + (f" {shlex.join(flags)}" if flags else ""), flags))
            (_, base_label, _), (_, head_label, _) = sides
            if base_label == head_label:
                raise SystemExit("base and head are the same revision with the same flags: nothing to compare")
            runs = {base_label: [], head_label: []}
            for r in range(args.rounds):
                for folder, label, flags in sides:
                    runs[label].append(tokens_per_s(folder, bench_args + flags))
                    print(f"round {r + 1}/{args.rounds}  {label:40s} {runs[label][-1]:>12,.0f} tokens/s", flush=True)
        finally:
            for name in os.listdir(tmp):
                subprocess.run(["git", "worktree", "remove", "--force", os.path.join(tmp, name)], cwd=ROOT,
                               capture_output=True)
    base_tps, head_tps = (statistics.median(runs[label]) for label in (base_label, head_label))
    print(f"\nbenchmark: bench/train_throughput.py {shlex.join(bench_args)} ({args.rounds} rounds, medians)")
    print("| revision | tokens/s | runs |\n|---|---|---|")
    for label, tps in ((base_label, base_tps), (head_label, head_tps)):
        print(f"| {label} | {tps:,.0f} | {', '.join(f'{t:,.0f}' for t in runs[label])} |")
    print(f"\nratio head / base: {head_tps / base_tps:.3f}x")


if __name__ == "__main__":
    main()
