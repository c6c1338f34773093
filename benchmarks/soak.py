#!/usr/bin/env python
"""Soak test: train on the built-in shapes dataset for a long while and watch the resident memory.

    SOLO_D2_DATASETS=/tmp/solo_soak/datasets python benchmarks/soak.py --output /tmp/solo_soak

Defaults: the tiny test config (``configs/tests/SOLO_tiny.yaml``: ResNet-18-FPN, 128 px inputs),
``shapes_train``, ``SOLVER.IMS_PER_BATCH 2``, 2,000 iterations, ``DATALOADER.NUM_WORKERS 0``,
1 torch thread: about 7-10 minutes on a CPU core. Every ``--every`` (200) iterations a Detectron2 hook
records the resident set size (RSS, from ``/proc/self/status``; data-loader worker processes
included when NUM_WORKERS > 0) and the time; at the end the table is printed and written to
``<output>/soak_rss.md`` and ``<output>/soak_rss.json``.

Verdict: the RSS growth from the first report after warm-up (``--warmup``, default 400 iterations)
to the last one must stay within ``--max-growth-mib`` (default 32 MiB); the exit status is 1
otherwise. Extra ``KEY VALUE`` pairs at the end of the command line override the config, e.g.
``MODEL.SOLO.HEAD_TYPE DecoupledSOLOHead`` or ``DATALOADER.NUM_WORKERS 2``.
"""
import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

import _setup  # noqa: E402
from _setup import REPO, load_cfg  # importing solo_d2 registers SOLO and the shapes datasets
from solo_d2.engine import Trainer


def rss_mib(pid="self") -> float:
    """Resident set size of a process in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/<pid>/status")


def children_rss_mib() -> float:
    """RSS of this process's direct children (data-loader workers), in MiB."""
    total = 0.0
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[1] == me:  # ppid
                total += rss_mib(pid)
        except (OSError, IndexError, RuntimeError):
            continue
    return total


class RSSHook(HookBase):
    """Records (iteration, RSS of this process, RSS of its children, wall time) every ``period``
    iterations (after the step), and once before training."""

    def __init__(self, period: int):
        self.period = period
        self.rows = []
        self._t0 = None

    def _record(self, iteration):
        gc.collect()
        self.rows.append(
            {
                "iter": iteration,
                "rss_mib": round(rss_mib(), 1),
                "workers_rss_mib": round(children_rss_mib(), 1),
                "elapsed_s": round(time.perf_counter() - self._t0, 1),
            }
        )
        r = self.rows[-1]
        print(
            f"[soak] iter {r['iter']:>6}  RSS {r['rss_mib']:8.1f} MiB  "
            f"workers {r['workers_rss_mib']:7.1f} MiB  {r['elapsed_s']:7.1f} s",
            flush=True,
        )

    def before_train(self):
        self._t0 = time.perf_counter()
        self._record(0)

    def after_step(self):
        done = self.trainer.iter + 1
        if done % self.period == 0:
            self._record(done)


def table(rows, warmup):
    base = next((r for r in rows if r["iter"] >= warmup), rows[-1])
    lines = [
        "| iteration | RSS (MiB) | workers RSS (MiB) | vs. iteration {} (MiB) | s/iter |".format(
            base["iter"]
        ),
        "|---:|---:|---:|---:|---:|",
    ]
    prev = None
    for r in rows:
        total = r["rss_mib"] + r["workers_rss_mib"]
        delta = total - (base["rss_mib"] + base["workers_rss_mib"])
        speed = ""
        if prev is not None and r["iter"] > prev["iter"]:
            speed = "{:.3f}".format((r["elapsed_s"] - prev["elapsed_s"]) / (r["iter"] - prev["iter"]))
        lines.append(
            "| {} | {:.1f} | {:.1f} | {} | {} |".format(
                r["iter"], r["rss_mib"], r["workers_rss_mib"],
                "{:+.1f}".format(delta) if r["iter"] >= base["iter"] else "(warm-up)", speed,
            )
        )
        prev = r
    return "\n".join(lines), base


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default=str(REPO / "configs" / "tests" / "SOLO_tiny.yaml"))
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--every", type=int, default=200, help="report RSS every N iterations")
    parser.add_argument(
        "--warmup", type=int, default=400, help="iterations excluded from the growth check"
    )
    parser.add_argument("--max-growth-mib", type=float, default=32.0)
    parser.add_argument("--batch", type=int, default=2, help="SOLVER.IMS_PER_BATCH")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    parser.add_argument("--output", default=str(REPO / "output" / "soak"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    setup_logger(name="fvcore")
    setup_logger()
    cfg = load_cfg(args.config_file)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('shapes_train',)", "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", str(args.batch), "SOLVER.MAX_ITER", str(args.iters),
        "SOLVER.STEPS", "({},)".format(int(args.iters * 0.8)),
        "SOLVER.CHECKPOINT_PERIOD", str(10**9),
        "SEED", "0", "OUTPUT_DIR", args.output,
    ])
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    os.makedirs(args.output, exist_ok=True)
    seed_all_rng(cfg.SEED)

    trainer = Trainer(cfg)
    hook = RSSHook(args.every)
    trainer.register_hooks([hook])
    # Measure before the other hooks run, so that the last row is not taken right after the
    # final checkpoint is written (torch.save leaves ~20 MiB of allocator cache behind).
    trainer._hooks.insert(0, trainer._hooks.pop())
    trainer.resume_or_load(resume=False)
    trainer.train()

    md, base = table(hook.rows, args.warmup)
    last = hook.rows[-1]
    growth = (last["rss_mib"] + last["workers_rss_mib"]) - (base["rss_mib"] + base["workers_rss_mib"])
    after = [r for r in hook.rows if r["iter"] >= base["iter"]]
    totals = [r["rss_mib"] + r["workers_rss_mib"] for r in after]
    its = [r["iter"] for r in after]
    slope = 0.0
    if len(after) > 1:  # least-squares slope, MiB per 1000 iterations
        mi, mt = sum(its) / len(its), sum(totals) / len(totals)
        var = sum((i - mi) ** 2 for i in its)
        slope = 1000 * sum((i - mi) * (t - mt) for i, t in zip(its, totals)) / var
    summary = (
        f"{args.iters} iterations, batch {args.batch}, {os.path.basename(args.config_file)}, "
        f"NUM_WORKERS {cfg.DATALOADER.NUM_WORKERS}, {args.threads} thread(s): RSS after warm-up "
        f"(iterations {base['iter']}-{last['iter']}) between {min(totals):.1f} and "
        f"{max(totals):.1f} MiB; growth {growth:+.1f} MiB (limit {args.max_growth_mib} MiB), "
        f"fitted slope {slope:+.2f} MiB per 1000 iterations; total {last['elapsed_s']:.0f} s"
    )
    print("\n" + md + "\n\n" + summary)
    Path(args.output, "soak_rss.md").write_text(md + "\n\n" + summary + "\n")
    Path(args.output, "soak_rss.json").write_text(json.dumps({"rows": hook.rows, "summary": summary}, indent=1))
    return 0 if growth <= args.max_growth_mib else 1


if __name__ == "__main__":
    sys.exit(_setup.run_tool(main))  # known errors: one line, exit 2
