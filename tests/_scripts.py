"""Import a script of ``benchmarks/`` as a module, for the tests that run it small."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name):
    """The module ``benchmarks/<name>.py``, executed (its ``main`` not called)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_quick(name, tmp_path, *args):
    """Run ``benchmarks/<name>.py --quick`` writing to ``tmp_path`` and return
    the text it wrote; torch's thread count must be what it was."""
    import torch

    bench = load_benchmark(name)
    out = tmp_path / f"{name}.md"
    threads = torch.get_num_threads()
    bench.main(["--quick", *args, "--out", str(out)])
    assert torch.get_num_threads() == threads
    return out.read_text()
