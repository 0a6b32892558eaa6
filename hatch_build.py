"""Build hook: compile the optional native module pyturn.net._batch from two C files:
pyturn/net/_udp_batch.c (batched UDP I/O) and pyturn/net/_fastpath.c (the relay fast
path reading the forwarding table).

pyturn runs without it (pyturn/net/batch.py falls back to one system call per
datagram), so a machine without a C compiler or Python headers still installs: the
hook then says why on stderr and builds a pure-Python wheel. PYTURN_NO_NATIVE=1 skips
it on purpose.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCES = (Path("pyturn/net/_udp_batch.c"), Path("pyturn/net/_fastpath.c"))


def _compile(root: Path) -> Path:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = root / SOURCES[0].with_name("_batch" + suffix)
    compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if shutil.which(compiler[0]) is None:
        raise RuntimeError(f"no C compiler ({compiler[0]})")
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        raise RuntimeError(f"no Python headers in {include}")
    argv = [
        *compiler,
        "-O2",
        "-fPIC",
        "-shared",
        "-Wall",
        f"-I{include}",
        *(str(root / source) for source in SOURCES),
        "-o",
        str(target),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed:\n{result.stderr}")
    return target


class NativeBuildHook(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or os.environ.get("PYTURN_NO_NATIVE"):
            return
        root = Path(self.root)
        try:
            target = _compile(root)
        except (OSError, RuntimeError) as exc:
            print(f"pyturn: building without the batching module: {exc}", file=sys.stderr)
            return
        # A wheel holding a compiled module is tied to this interpreter and platform.
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":  # an editable install imports it from the source tree
            build_data["force_include"][str(target)] = str(target.relative_to(root))
