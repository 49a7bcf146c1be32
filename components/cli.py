"""How a step's command line ends: expected failures as one message and a distinct exit code, a
traceback only for a real bug or with --debug.

    python -m components.<step> ... [--debug] [--verbose]

Exit codes: 0 done; 1 a bug (traceback); 2 configuration (params.yaml, arguments); 3 input data;
4 pretrained weights (fetching, checking, loading); 5 training diverged; 6 MLflow (tracking,
registry); 7 storage (a file or folder that cannot be read or written, a full disk); 130 stopped by
Ctrl-C, 143 by SIGTERM (128 + the signal, as a shell reports it), in one line.
MLflow's INFO lines and artifact progress bars are left out unless --verbose.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import re
import signal
import sys
import threading
import traceback
from pathlib import Path

# By class name, most specific first (several are ValueErrors), so that neither this module nor a step's
# dependencies in dvc.yaml take in every step, and a step run as __main__ (whose classes are copies) matches.
CODES = (("ConfigError", 2), ("DataError", 3), ("SourceError", 3), ("DatasetError", 3), ("FetchError", 4),
         ("WeightsError", 4), ("TrainingError", 5), ("MlflowException", 6), ("TimeoutError", 6), ("OSError", 7))


def exit_code(err: BaseException) -> int | None:
    """The exit code of an expected failure, None for a bug."""
    if isinstance(getattr(err, "exit_code", None), int):  # a failure passed on with its code (a process's)
        return err.exit_code
    names = {cls.__name__ for cls in type(err).__mro__}
    return next((code for name, code in CODES if name in names), None)


def describe(err: BaseException) -> str:
    """The message a person needs: for a storage error the file and the reason, the disk when full."""
    if isinstance(err, OSError) and not isinstance(err, TimeoutError):
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f)
        reason = "no space left on the disk" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        return f"{where}: {reason}" if where else reason
    return getattr(err, "message", None) or str(err)  # MlflowException keeps it in .message


def quiet_libraries() -> None:
    """MLflow logs INFO lines a user cannot act on ("Validating input example against model signature") and
    draws a progress bar for every artifact it copies."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _stop_on_sigterm() -> list[int]:
    """SIGTERM (Kubeflow stopping a pod, `kill`) ends the step as Ctrl-C does; the list gets the signal."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        return got

    def stop(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    return got


def run(main, argv: list[str] | None = None) -> int:
    """Call a step's `main(argv)`; map the expected failures to one message and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, verbose = "--debug" in argv, "--verbose" in argv
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    if not verbose:
        quiet_libraries()
    # components/finetune.py under `python -m components.finetune`; a package's __main__.py: the package
    path = Path(sys.argv[0])
    step = path.parent.name if path.stem == "__main__" else path.stem
    stopped_by = _stop_on_sigterm()
    try:
        return main(argv)
    except KeyboardInterrupt as err:
        if debug:
            raise
        epoch = getattr(err, "last_finished_epoch", None)
        print(f"{step}: interrupted{f' after epoch {epoch}' if epoch else ''}; `make run` (or `dvc repro`) "
              "continues from there", file=sys.stderr)
        # the training run's own SIGTERM handler says which signal in the message (components/tracking/runs.py)
        by = re.search(r"stopped by signal (\d+)", str(err))
        return 128 + (stopped_by[0] if stopped_by else int(by.group(1)) if by else signal.SIGINT)
    except Exception as err:  # noqa: BLE001 - sorted below: expected ones get a line, bugs a traceback
        code = None if debug else exit_code(err)
        if code is None:
            if debug:
                raise
            traceback.print_exc()
            return 1
        print(f"{step}: error: {describe(err)}", file=sys.stderr)
        return code


def run_process(main) -> None:
    """`run(main)` as the whole of a step's process (`python -m components.<step>`), then exit with its code.

    What the process built is left out of the collector's sweep at exit (gc.freeze): with torch and MLflow
    loaded that sweep took 1.2-1.4 s of a fine-tune process's end against 0.3 s frozen (a 2-epoch resnet18
    run, 650,000 tracked objects). Refcounting still frees the rest, atexit handlers still run and the
    standard streams are flushed; only objects in reference cycles keep their memory until the process
    goes, and their __del__ is not called, which Python does not promise at exit anyway (its data model,
    object.__del__). Not for a caller that goes on living, as tests calling `run` in-process do.
    """
    code = run(main)
    gc.freeze()
    sys.exit(code)
