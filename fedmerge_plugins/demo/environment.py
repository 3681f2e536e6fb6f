"""The environment a demo run measured in: the trained weights, and so every number, depend
on the CPU's arithmetic (its vector unit picks torch's kernels), the thread counts and the
library versions; ``report.md`` and ``results.json`` record them."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# flag prefixes of /proc/cpuinfo that name vector instructions (x86 and Arm)
VECTOR_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "amx", "asimd", "sve", "neon")
PACKAGES = ("torch", "transformers", "mergekit", "lm_eval", "tokenizers")


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> Tuple[Optional[str], List[str]]:
    """(CPU model, its vector flags sorted) from the first processor of ``/proc/cpuinfo``."""
    try:
        text = path.read_text()
    except OSError:
        return platform.processor() or None, []
    model, flags = None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = sorted(f for f in value.split() if f.startswith(VECTOR_PREFIXES))
        elif not line.strip() and model is not None and flags:
            break
    return model, flags


def versions() -> Dict[str, Optional[str]]:
    found: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def describe(*, workers: int, threads: int, cores: int, build_key: str) -> dict:
    """What ``report.md`` shows under "Environment" (and ``results.json`` keeps)."""
    import torch

    model, flags = cpu_info()
    return {
        "cpu": model,
        "vector_flags": flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": cores,
        "training": f"{workers} worker process(es), 1 torch thread each",
        "evaluation_threads": threads,
        "platform": platform.platform(),
        "versions": versions(),
        "build_key": build_key,
    }


def environment_lines(environment: dict) -> List[str]:
    """Markdown list lines for ``report.md``."""
    if not environment:
        return ["- not recorded"]
    names = {"python": "Python", "lm_eval": "lm-eval"}
    packages = ", ".join(f"{names.get(k, k)} {v or 'absent'}" for k, v in environment["versions"].items())
    return [
        f"- CPU: {environment['cpu'] or 'unknown'} ({environment['cores']} core(s) available); torch's CPU kernels: "
        f"{environment['torch_cpu_capability']}; vector flags: {' '.join(environment['vector_flags']) or 'none found'}",
        f"- Training: {environment['training']}; evaluation and merging: {environment['evaluation_threads']} torch thread(s)",
        f"- {packages}; {environment['platform']}",
        f"- Build key: `{environment['build_key']}` (hash of the build settings, the training code and the library versions)",
    ]
