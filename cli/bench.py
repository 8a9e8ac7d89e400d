"""`fermi bench`: the benchmark harness (bench/, `python -m bench`) as a verb.

The harness lives beside the package in a source checkout; an installed fermi
without it says so instead of failing at startup."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from fermi.errors import FermiError


def _harness():
    """bench/__main__.py as a module: `fermi.bench` when installed as part of fermi,
    else the `bench` package of the source checkout this cli/ belongs to."""
    try:
        return importlib.import_module("fermi.bench.__main__")
    except ImportError:
        pass
    checkout = Path(__file__).resolve().parent.parent / "bench"
    if not (checkout / "__main__.py").is_file():
        return None
    # Loaded by location: a `bench` elsewhere on sys.path (the working directory's) must not win.
    if getattr(sys.modules.get("bench"), "__path__", None) != [str(checkout)]:
        spec = importlib.util.spec_from_file_location("bench", checkout / "__init__.py",
                                                      submodule_search_locations=[str(checkout)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = module
        spec.loader.exec_module(module)
    try:
        return importlib.import_module("bench.__main__")
    except ImportError:
        return None


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark fermi's backends against peer engines",
                       description="Run the same workloads on fermi's backends and on the peers "
                       "(transformers, llama.cpp, mlx-lm), one process per engine; see bench/README.md.")
    harness = _harness()
    if harness is not None:
        harness.add_arguments(p)
    p.set_defaults(func=lambda args: _run(harness, args))


def _run(harness, args) -> int:
    if harness is None:
        raise FermiError("fermi bench needs the bench/ harness of a source checkout (run it there: python -m bench)")
    args.command = "fermi " + " ".join(sys.argv[1:])
    return harness.run(args)
