"""Where an incremental TIES merge's time goes on this machine (D2C's merge in the loop).

Times, on a library: a merge one task away from a kept member set, the per-module rank-r
truncations alone (romscale.adapters.factors.truncate_dense, as the CPU merge runs them), and, on
the 576 x 576 Grams of those updates, LAPACK's subset eigh against block subspace iteration
(romscale.adapters.batched.top_eigenvectors) at three tolerances. Prints the figures; --json also
writes them.

    python benchmarks/ties_merge_cost.py --lib runs/adapters-cpu16/lib --json results/ties_merge_cost_cpu.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import scipy.linalg
import torch

from romscale.adapters.batched import top_eigenvectors
from romscale.adapters.factors import truncate_dense
from romscale.adapters.library import load_library
from romscale.adapters.merge import MergeOptions
from romscale.adapters.ties_sums import IncrementalTies
from romscale.errors import RomscaleError
from romscale.utils.machine import machine_line
from romscale.utils.outputs import check_target, write_json_output

KIND = "ties-merge-cost"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", required=True, help="a romscale adapter library folder")
    ap.add_argument("--members", type=int, default=4, help="tasks per merged cluster")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    try:
        if args.json:
            check_target(args.json, kind=KIND, overwrite=True, is_file=True, what="--json")  # before the work
        lib = load_library(args.lib)
        if len(lib.names) < args.members + 1:
            raise RomscaleError(f"--lib {args.lib}: needs at least {args.members + 1} adapters, has {len(lib.names)}")
        measure(args, lib)
    except RomscaleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def measure(args: argparse.Namespace, lib) -> None:
    names, m = lib.names, args.members
    inc = IncrementalTies(lib, MergeOptions(density=0.5, seed=0))
    for i in range(len(names)):  # every task trimmed once, as in D2C's steady state
        inc.trimmed(i)
    out: dict = {"first_merge_s": timed(lambda: inc.merge(names[:m])),
                 "merge_one_task_away_s": timed(lambda: inc.merge(names[:m + 1]))}
    s = inc.sums(frozenset(range(m + 1)))
    dense = {mod: inc._merged_dense(s, mod).view(*lib.shapes[mod]) for mod in lib.modules}
    out["modules"] = len(dense)
    out["truncate_all_modules_s"] = timed(lambda: [truncate_dense(x, args.rank) for x in dense.values()])
    big = [x.double() for x in dense.values() if min(x.shape) >= 4 * args.rank and x.shape[0] == x.shape[1]]
    out["square_modules"] = len(big)
    if not big:
        raise RomscaleError(f"--lib {args.lib}: no square module of at least {4 * args.rank} x {4 * args.rank} to time the eigensolvers on")
    grams: list[torch.Tensor] = []
    out["grams_s"] = timed(lambda: grams.extend(x @ x.T for x in big))
    n, k = grams[0].shape[0], args.rank
    out["subset_eigh_s"] = timed(lambda: [scipy.linalg.eigh(g.numpy(), subset_by_index=[n - k, n - 1]) for g in grams])
    G = torch.stack(grams)
    exact = torch.linalg.eigh(G)[1][..., n - k:]
    p_exact = exact @ exact.transpose(1, 2)
    out["subspace"] = []
    for tol in (1e-10, 1e-8, 1e-6):
        t0 = time.perf_counter()
        X = top_eigenvectors(G, k, method="subspace", tol=tol)
        sec = time.perf_counter() - t0
        out["subspace"].append({"tol": tol, "s": sec, "projector_max_abs_diff": float((X @ X.transpose(1, 2) - p_exact).abs().max())})
    for key, v in out.items():
        print(f"{key:28s} {v}")
    if args.json:
        write_json_output(args.json, {"command": shlex.join(["python", *sys.argv]), "machine": machine_line(),
                                      "library": str(args.lib), "members": m, "rank": args.rank, **out},
                          kind=KIND, overwrite=True, what="TIES merge cost")


if __name__ == "__main__":
    main()
