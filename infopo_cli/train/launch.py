"""`infopo train --nproc N`: start this same command as N processes under torch's own launcher (torchrun).

The launcher runs in this process, so its failures are one line here instead of torchrun's traceback. It
forwards SIGINT/SIGTERM to the processes, which finish their step and save (train/stops.py takes a
terminal's Ctrl-C, which reaches them directly as well as through the launcher, as one request); the
launcher gives them 30 s to do so before it kills them (the last complete checkpoint then stays).
"""

from __future__ import annotations

import logging
import os
import sys

from infopo_cli.errors import InfopoError

STOP_CODES = range(128, 160)  # a process ended by a signal request: it said so itself


class LaunchError(InfopoError):
    """The launcher or a training process failed: exit 1, the run's own failure rather than a usage error."""

    exit_code = 1


def under_launcher() -> bool:
    """Whether torchrun or `accelerate launch` started this process (both set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def launch(nproc: int, argv: list[str]) -> int:
    """Run `infopo ARGV` as `nproc` local processes; the exit code of rank 0 (or of the first that failed)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure report is a line below
    # each process gets its share of the cores (torchrun would give each one thread and warn about it)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "infopo_cli", *argv])
    try:
        run(args)
    except SignalException as err:  # SIGTERM/SIGINT here: passed on to the processes, which saved and said so
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        failures = dict(sorted(err.failures.items()))  # global rank -> ProcessFailure(exitcode, ...)
        # the run's own reason (a stop, out of memory, bad input: it said so), rank 0's first; then any real failure;
        # a process the launcher ended (negative code) because another failed is not the reason
        said = [f for f in failures.values() if f.exitcode in STOP_CODES or f.exitcode in (2, 3, 4)]
        first = (said or [f for f in failures.values() if f.exitcode > 0] or list(failures.values()))[0]
        for rank, failure in failures.items():
            if failure.exitcode not in STOP_CODES and failure.exitcode not in (2, 3, 4) and (failure.exitcode > 0 or not said):
                print(f"error: process {rank} of {nproc} exited with code {failure.exitcode}", file=sys.stderr)
        return first.exitcode if first.exitcode > 0 else 1
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus `--nproc N` / `--nproc=N` (the processes must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
