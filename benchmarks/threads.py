"""``learn(2048)`` on CartPole-v1 with torch's default thread count and with one thread (issue 15).

Each measurement runs in a fresh process (the thread count of a process cannot be undone cleanly):

    python benchmarks/threads.py                 # pgvar.PPO(baseline="optimal") and SB3's PPO, both ways

Measured on this project's 2-core machine while other jobs shared it (load average 4-6; torch 2.13.0+cpu,
SB3 2.9.2), two runs:

=================================  =====================  ==========
learn(2048) on CartPole-v1         torch default (2)      one thread
=================================  =====================  ==========
pgvar.PPO(baseline="optimal")      69.9 s, 55.7 s         3.8 s, 4.5 s
stable_baselines3.PPO              41.6 s, 30.8 s         2.8 s, 4.6 s
=================================  =====================  ==========

The gap comes from OpenMP's threads spinning while they wait for busy cores; on an idle machine it is smaller,
but for these small networks one thread is not slower.
"""

from __future__ import annotations

import subprocess
import sys
import time

PROBE = """
import sys, time, torch
threads, which = sys.argv[1], sys.argv[2]
if threads == "one":
    torch.set_num_threads(1)
if which == "pgvar":
    from pgvar import PPO
    kwargs = {"baseline": "optimal"}
else:
    from stable_baselines3 import PPO
    kwargs = {}
model = PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu", **kwargs)
start = time.perf_counter()
model.learn(2048)
print(f"{which:5} torch threads {torch.get_num_threads()} ({threads}): learn(2048) {time.perf_counter() - start:.1f} s")
"""


def main() -> None:
    for which in ("pgvar", "sb3"):
        for threads in ("default", "one"):
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE, threads, which], capture_output=True,
                                    text=True, check=True)  # fmt: skip
            print(result.stdout.strip(), f"(process {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
