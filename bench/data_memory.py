"""Peak memory of reading a JSONL corpus as it grows: figures, not a test.

    python bench/data_memory.py --sizes_mb 25 100

For each size, writes a synthetic pretraining file and an SFT file of about that many MB (demo lines repeated),
then, in a fresh process each, builds the PretrainDataset (tokenise into the uint16 cache, memmap it) and the
SFTDataset (index + validate every line) and reads every sample once. Prints the process's peak RSS: if the
data never sits in Python lists, it stays about the same whatever the file size.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(kind, path, cache):
    sys.path.insert(0, ROOT)
    from dataset.pretrain import PretrainDataset
    from dataset.sft import SFTDataset
    from model.tokenizer import Tokenizer
    tok = Tokenizer()
    t = time.time()
    if kind == "pretrain":
        data = PretrainDataset(path, tok, 512, cache)
    else:
        data = SFTDataset(path, tok, 512, None)
    built = time.time() - t
    for i in range(0, len(data), max(1, len(data) // 2000)):  # touch samples across the whole file
        data[i]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{kind:8s} {os.path.getsize(path) / 1e6:7.0f} MB file: {len(data):9,d} samples, built in {built:5.1f} s, "
          f"peak RSS {rss:6.0f} MB")


def make_file(src, dst, size_mb):
    with open(src, "rb") as f:
        lines = f.readlines()
    with open(dst, "wb") as f:
        written = 0
        while written < size_mb * 1e6:
            for line in lines:
                f.write(line)
                written += len(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes_mb", type=int, nargs="+", default=[25, 100])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes_mb:
            for kind, src in (("pretrain", "dataset/demo/pretrain_wordnet.jsonl"), ("sft", "dataset/demo/sft_cedict.jsonl")):
                path = os.path.join(tmp, f"{kind}_{size}.jsonl")
                make_file(os.path.join(ROOT, src), path, size)
                subprocess.run([sys.executable, __file__, "--child", kind, path, os.path.join(tmp, "cache")], check=True)
                os.remove(path)


if __name__ == "__main__":
    main()
