"""How fast is one meta-training iteration? A table per backbone x {MELO, MAML++} x catalog size.

    python benchmark.py                                  # the default configuration, 1,000 and 50,000 items
    python benchmark.py --models=gru4rec --methods=melo --items=1000 --repeats=5
    python benchmark.py --reference=False                # skip the (slow) per-task reference path
    python benchmark.py --batch_sizes=16,64,256 --reference=False   # tasks per meta-batch, swept

One outer iteration is what `main.py`'s `MetaTrainer.train_step` does: the outer loss of every task of a
meta-batch (inner loop, second order, multi-step loss of iteration 0, so the query set is scored after
every inner step), its backward, gradient clipping and one Adam step over every meta-learned parameter,
the whole item table included, built by `meta_learner.build_meta_training` as main.py builds it. Building the
meta-batch (`MetaDataset.train_batch`) is timed apart.

The data are generated (no download): `--num_users` users with 40..200 ratings each over a catalog of
exactly `--items` items with a long-tailed (Zipf-like) popularity and item ids shuffled over the catalog,
so a task reads up to ~30 distinct items scattered over the whole table (a task's windows come from one
stretch of at most `--max_seq_len` of its user's items). Every (backbone, method, catalog, path) runs in
a fresh subprocess, one after the other, so runs do not disturb each other and memory starts clean.

Columns: seconds per outer iteration (median over `--repeats` iterations after one warm-up, each on a
new meta-batch) and tasks per second; peak memory of an iteration (CPU: how far the process's peak
resident set rose above what it held after the set-up, the warm-up included, so allocator caches count;
CUDA: `max_memory_allocated` above what was allocated after the set-up); the median time to build a
meta-batch; and the same figures for the simple per-task path (`fast=False`, whole item table) with the
ratio of the two. With several catalogs, the fast path's cost per catalog is also measured in one
process with iterations alternating between the catalogs, for a ratio that the machine's drift does not
bias. The load average and a machine-speed calibration (three fixed workloads) are
printed at the start and the end: on a shared or virtual machine, compare tables only at similar speeds.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import flag_types  # noqa: E402
from common.errors import MeloError  # noqa: E402
from common.runtime import Distributed, configure_cpu, select_device  # noqa: E402
from evaluation import baselines  # noqa: E402
from meta_learner import build_meta_training, outer_step, step_weights  # noqa: E402
from models import BACKBONES  # noqa: E402
import options  # noqa: E402
from ratings.preprocess import RatingData  # noqa: E402
from ratings.readers import MAX_RATING  # noqa: E402
from ratings.tasks import MetaDataset  # noqa: E402

METHODS = ("melo", "maml")


# ------------------------------------------------------------------------------------------- data
def synthetic_data(num_items, num_users, seed=0):
    """RatingData over items 1..num_items (every one rated at least once), users of 40..200 ratings."""

    rng = np.random.default_rng([seed, num_items])
    lengths = rng.integers(40, 201, size=num_users)
    total = int(lengths.sum())
    popularity = 1.0 / (np.arange(num_items) + 10.0)  # Zipf-like, exponent 1
    popularity /= popularity.sum()
    rank_to_item = rng.permutation(num_items) + 1  # popular items scattered over the id range
    items = rank_to_item[rng.choice(num_items, size=total, p=popularity)]
    items[:num_items] = rank_to_item  # every item of the catalog occurs
    user_bias = rng.normal(0, 0.4, num_users)
    item_bias = rng.normal(0, 0.5, num_items + 1)
    user_of = np.repeat(np.arange(num_users), lengths)
    ratings = np.clip(np.round(3.6 + user_bias[user_of] + item_bias[items] + rng.normal(0, 0.5, total)), 1, 5)
    offsets = np.zeros(num_users + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return RatingData(offsets=offsets, items=items.astype(np.int64), ratings=ratings.astype(np.float32),
                      timestamps=np.arange(total, dtype=np.int64), user_ids=np.arange(num_users, dtype=np.int64),
                      item_ids=np.arange(1, num_items + 1, dtype=np.int64), num_items=num_items,
                      max_rating=MAX_RATING)


# ------------------------------------------------------------------------------------------- memory
def _status_kib(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_peak_memory(device):
    """Start a new peak-memory window; returns the baseline (bytes) it is measured against."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM (the peak resident set) to the current resident set
    except OSError:
        return None
    return _status_kib("VmRSS") * 1024


def peak_memory(device, baseline):
    if baseline is None:
        return float("nan")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - baseline
    return _status_kib("VmHWM") * 1024 - baseline


# ------------------------------------------------------------------------------------------- machine speed
def calibration(device):
    """Seconds for three fixed workloads (best of three): 50 products of 512x512 matrices, 20 passes over
    4M floats, 20,000 tiny ops. On a shared or virtual machine these drift by tens of percent from
    minute to minute; printed with the table so two tables can be compared."""
    matrix = torch.randn(512, 512, device=device)
    vector = torch.randn(1 << 22, device=device)
    tiny = torch.randn(2, 2, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def once():
        times = []
        for work in (lambda: [matrix @ matrix for _ in range(50)], lambda: [vector * 1.0001 for _ in range(20)],
                     lambda: [tiny + 1 for _ in range(20000)]):
            sync()
            start = time.perf_counter()
            work()
            sync()
            times.append(time.perf_counter() - start)
        return times

    once()
    return [min(column) for column in zip(*(once() for _ in range(3)))]


# ------------------------------------------------------------------------------------------- one case
def case_args(model, method, extra):
    return options.parse_args([f"--model={model}", f"--use_adaptive_loss={method == 'melo'}",
                               "--num_test_data=100", "--val_size=50", *extra])


class Case:
    """One (backbone, method, catalog, path) set up as main.py would: data, learner, optimizer, schedule."""

    def __init__(self, model, method, num_items, path, device, extra, num_users):
        self.args = args = case_args(model, method, extra)
        self.device, self.fast = device, path == "fast"
        torch.manual_seed(args.random_seed)
        data = synthetic_data(num_items, num_users)
        self.dataset = MetaDataset.from_args(data, args)

        def start_head(backbone):
            baselines.start_bias_head(backbone, data, self.dataset, args)

        # built and started as main.py does (b_user's fold-in start costs a forward per task)
        self.learner, self.optimizer, self.scheduler = build_meta_training(args, num_items, 5.0, device, start_head)
        self.learner.train()
        self.dist = Distributed(str(device))
        # iteration 0: the multi-step loss scores the query after every inner step (the costliest case)
        self.weights = step_weights(args, 0)
        self.build_times, self.next_index = [], 0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def build(self):
        """The next meta-batch (timed apart)."""
        start = time.perf_counter()
        batch = self.dataset.train_batch(self.next_index).to(self.device)
        self.sync()
        self.build_times.append(time.perf_counter() - start)
        self.next_index += 1
        return batch

    def iteration(self, batch):
        """meta_learner.outer_step, main.py's outer iteration (one process, second order); returns (seconds,
        loss)."""
        args = self.args
        self.sync()
        start = time.perf_counter()
        loss = outer_step(self.learner, self.optimizer, self.scheduler, batch, self.weights,
                          self.dataset.batch_size, self.dist, task_chunk=args.task_chunk, grad_clip=args.grad_clip,
                          fast=self.fast)
        self.sync()
        return time.perf_counter() - start, loss


def run_case(model, method, num_items, path, repeats, device, extra, num_users):
    """Time `repeats` outer iterations of one path ('fast' or 'reference') after one warm-up."""
    case = Case(model, method, num_items, path, device, extra, num_users)
    baseline = reset_peak_memory(device)  # after the set-up, before the first iteration
    case.iteration(case.build())  # warm-up
    times, losses = zip(*(case.iteration(case.build()) for _ in range(repeats)))
    return {"model": model, "method": method, "items": num_items, "path": path, "tasks": case.dataset.batch_size,
            "median_s": statistics.median(times), "min_s": min(times), "times": list(times),
            "peak_bytes": peak_memory(device, baseline), "build_s": statistics.median(case.build_times),
            "finite": bool(np.isfinite(losses).all()), "threads": torch.get_num_threads()}


def run_ratio(model, method, catalogs, repeats, device, extra, num_users):
    """The fast path on every catalog in one process, iterations alternating between catalogs (and the
    order reversed every round), so that the machine's drift falls on all of them alike."""
    cases = [Case(model, method, items, "fast", device, extra, num_users) for items in catalogs]
    for case in cases:
        case.iteration(case.build())  # warm-up
    times = [[] for _ in cases]
    for round_ in range(repeats):
        order = range(len(cases)) if round_ % 2 == 0 else reversed(range(len(cases)))
        for k in order:
            times[k].append(cases[k].iteration(cases[k].build())[0])
    return {"model": model, "method": method, "catalogs": list(catalogs), "path": "ratio",
            "median_s": [statistics.median(t) for t in times], "times": times}


# ------------------------------------------------------------------------------------------- driver
def format_table(results, loads, calibrations=None):
    """A markdown table: one row per (backbone, method, catalog), the fast path and the reference."""
    fast = {(r["model"], r["method"], r["items"], r["tasks"]): r for r in results if r["path"] == "fast"}
    reference = {(r["model"], r["method"], r["items"], r["tasks"]): r for r in results if r["path"] == "reference"}
    first = results[0]
    sizes = sorted({r["tasks"] for r in results if r["path"] != "ratio"})
    tasks = str(sizes[0]) if len(sizes) == 1 else "/".join(map(str, sizes))
    lines = [f"torch {torch.__version__}, {first['device']}, {first['threads']} threads; {tasks} tasks x "
             f"{first['support']} support windows x {first['query']} queries, length {first['length']}, "
             f"{first['inner_steps']} inner steps, second order, multi-step loss of iteration 0; freed memory "
             f"{'kept' if first.get('keep_freed_memory') else 'returned to the OS'} (--keep_freed_memory); "
             f"load average (1/5/15 min) at start {loads[0]}, at end {loads[1]}",
             *([f"machine speed (s; 512² matmuls / 4M-float passes / tiny ops) at start "
                f"{' / '.join(f'{x:.3f}' for x in calibrations[0])}, at end "
                f"{' / '.join(f'{x:.3f}' for x in calibrations[1])}"] if calibrations else []),
             "",
             "| backbone | method | items | tasks | s / iteration | tasks / s | peak MiB | build ms "
             "| per-task s / iteration | per-task peak MiB | speed-up |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, r in fast.items():
        row = [r["model"], r["method"], f"{r['items']:,}", str(r["tasks"]), f"{r['median_s']:.3f}",
               f"{r['tasks'] / r['median_s']:.1f}",
               f"{r['peak_bytes'] / 2 ** 20:.0f}", f"{r['build_s'] * 1e3:.1f}"]
        ref = reference.get(key)
        row += ([f"{ref['median_s']:.3f}", f"{ref['peak_bytes'] / 2 ** 20:.0f}",
                 f"{ref['median_s'] / r['median_s']:.1f}x"] if ref else ["-", "-", "-"])
        lines.append("| " + " | ".join(row) + " |")
    ratios = [r for r in results if r["path"] == "ratio"]
    if ratios:
        lines.append("")
        lines.append("Catalog size, measured apart (one process, iterations alternating between the catalogs):")
        for r in ratios:
            small, large = r["median_s"][0], r["median_s"][-1]
            lines.append(f"{r['model']} {r['method']}: {r['catalogs'][-1]:,} items cost {large / small:.2f}x what "
                         f"{r['catalogs'][0]:,} items cost ({large:.3f} s vs {small:.3f} s)")
    return "\n".join(lines)


def load_average():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def parse(argv):
    parser = options.CommandLineParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     epilog="Any other flag is passed to main.py's parser (e.g. --num_inner_steps=5).")
    parser.add_argument("--models", default=",".join(BACKBONES), help="comma-separated backbones")
    parser.add_argument("--methods", default="melo,maml", help="comma-separated: melo, maml")
    parser.add_argument("--items", default="1000,50000", help="comma-separated catalog sizes")
    parser.add_argument("--repeats", type=flag_types.positive_int, default=7,
                        help="timed iterations of the fast path (after a warm-up)")
    parser.add_argument("--reference", type=flag_types.str2bool, default=True,
                        help="also time the per-task reference path (fast=False)")
    parser.add_argument("--reference_repeats", type=flag_types.positive_int, default=3,
                        help="timed iterations of the reference path (after a warm-up)")
    parser.add_argument("--num_users", type=flag_types.positive_int, default=2000, help="users of the generated data set")
    parser.add_argument("--batch_sizes", type=flag_types.comma_list(flag_types.positive_int), default=None,
                        help="tasks per meta-batch to sweep, e.g. 16,64,256 (default: main.py's --batch_size)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0 = PyTorch's default)")
    parser.add_argument("--json", default=None, help="also write the raw results to this file")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: model:method:items:path
    known, extra = parser.parse_known_args(argv)
    known.extra = extra
    # checked here, before any case runs: a typo must not label one method's figures with another's name
    for flag, values, allowed in (("--models", known.models, tuple(BACKBONES)), ("--methods", known.methods, METHODS)):
        unknown = [value for value in values.split(",") if value not in allowed]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    if not all(value.isdigit() and int(value) > 0 for value in known.items.split(",")):
        parser.error(f"--items={known.items}: give comma-separated positive item counts, e.g. 1000,50000")
    if any(flag.startswith("--use_adaptive_loss") for flag in extra):
        parser.error("--use_adaptive_loss: the benchmark sets it per method; choose them with --methods")
    if known.batch_sizes and any(flag.startswith("--batch_size") for flag in extra):
        parser.error("--batch_size and --batch_sizes: give the meta-batch sizes with --batch_sizes alone")
    try:
        known.device = select_device(known.device)
    except MeloError as error:
        parser.error(str(error))
    return known


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = args.device
    if args.case is not None:  # one case in this (fresh) process
        model, method, items, path, tasks = args.case.split(":")
        extra = args.extra + ([f"--batch_size={tasks}"] if tasks != "-" else [])
        config = case_args(model, method, extra)
        kept = configure_cpu(config)  # as main.py does (its --num_threads: benchmark.py's own, set above)
        if path == "ratio":
            result = run_ratio(model, method, [int(n) for n in items.split("+")], args.repeats, device, extra,
                               args.num_users)
            print("RESULT " + json.dumps(result))
            return result
        repeats = args.repeats if path == "fast" else args.reference_repeats
        result = run_case(model, method, int(items), path, repeats, device, extra, args.num_users)
        result.update(device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                      keep_freed_memory=kept,
                      support=config.num_samples, query=config.num_query_set, length=config.max_seq_len,
                      inner_steps=config.num_inner_steps)
        print("RESULT " + json.dumps(result))
        return result

    models, methods, catalogs = args.models.split(","), args.methods.split(","), args.items.split(",")
    sizes = [str(size) for size in args.batch_sizes] if args.batch_sizes else ["-"]  # "-": --batch_size
    cases = [(model, method, items, path, tasks)
             for path in (("fast", "reference") if args.reference else ("fast",))
             for model in models for method in methods for items in catalogs for tasks in sizes]
    if len(catalogs) > 1:  # the catalog's cost, at the first meta-batch size
        cases += [(model, method, "+".join(catalogs), "ratio", sizes[0]) for model in models for method in methods]
    loads, results = [load_average()], []
    calibrations = [calibration(device)]
    for model, method, items, path, tasks in cases:
        case = f"{model}:{method}:{items}:{path}:{tasks}"
        command = [sys.executable, os.path.abspath(__file__), f"--case={case}", *argv]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not found:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"benchmark case {case} failed")
        result = json.loads(found[-1][len("RESULT "):])
        if not result.get("finite", True):
            raise SystemExit(f"benchmark case {case}: non-finite loss")
        results.append(result)
        medians = result["median_s"] if path == "ratio" else [result["median_s"]]
        print(f"{model} {method} {items} items, {path}, {tasks} tasks: median {' / '.join(f'{m:.3f}' for m in medians)} s, "
              f"load {load_average()}", file=sys.stderr, flush=True)
    loads.append(load_average())
    calibrations.append(calibration(device))
    print(format_table(results, loads, calibrations))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
