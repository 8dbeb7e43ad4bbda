"""Wall time of `python toy/demo.py`: the median of several runs, as a fresh process each time.

    python toy/bench_demo.py                 # 3 warm runs (pretrained weights cached in toy/out/)
    python toy/bench_demo.py --cold          # first run without the cache (pays the pretraining)
    python toy/bench_demo.py --demo-args=--fast
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOY = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--cold", action="store_true", help="delete the cached pretrained weights first")
    parser.add_argument("--demo-args", default="", help="arguments passed on to demo.py")
    args = parser.parse_args()
    command = [sys.executable, str(TOY / "demo.py"), *args.demo_args.split()]
    if args.cold:
        for cached in (TOY / "out").glob("pretrained_*.pt"):
            cached.unlink()
    times = []
    for run in range(args.runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        label = "cold (pretraining included)" if args.cold and run == 0 else "warm"
        print(f"run {run + 1}: {times[-1]:.1f} s  [{label}]", flush=True)
    print(f"{' '.join(command[1:])}: median {statistics.median(times):.1f} s over {args.runs} runs "
          f"(min {min(times):.1f}, max {max(times):.1f})")


if __name__ == "__main__":
    main()
