"""``stvit env`` and benchmark results name the malloc the process runs on (it moves CPU timings at detection sizes)."""

from __future__ import annotations

import ctypes.util
import json
import os
import platform

import pytest

from stvit_core.env import memory_allocator

from .conftest import run_cli

LIBC = "glibc" if platform.libc_ver()[0] == "glibc" else "system"


def _maps(tmp_path, *libs: str) -> str:
    path = tmp_path / "maps"
    path.write_text("".join(f"7f00{i:08x}-7f01{i:08x} r-xp 00000000 08:01 {i} {lib}\n" for i, lib in enumerate(libs))
                    + "7ffd0000-7ffd1000 rw-p 00000000 00:00 0 [stack]\n")
    return str(path)


def test_allocator_from_the_mapped_libraries(tmp_path):
    libc = "/usr/lib/x86_64-linux-gnu/libc.so.6"
    assert memory_allocator(_maps(tmp_path, libc)) == LIBC
    assert memory_allocator(_maps(tmp_path, libc, "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")) == "jemalloc"
    assert memory_allocator(_maps(tmp_path, "/opt/gperftools/lib/libtcmalloc_minimal.so.4.5.10", libc)) == "tcmalloc"
    assert memory_allocator(_maps(tmp_path, "/home/u/mimalloc/libmimalloc.so.2.1")) == "mimalloc"
    # a path that merely contains the word is not the allocator
    assert memory_allocator(_maps(tmp_path, "/data/jemalloc-notes/libfoo.so", libc)) == LIBC
    assert memory_allocator(str(tmp_path / "missing")) == LIBC


@pytest.mark.slow
def test_env_and_benchmark_report_the_default_allocator():
    env = {"LD_PRELOAD": ""}  # whatever the caller preloads, this process runs on the C library's malloc
    info = json.loads(run_cli("env", "--json", env=env, check=True, fresh_process=True).stdout)
    assert info["memory_allocator"] == LIBC
    if LIBC == "glibc":
        proc = run_cli("benchmark", "deit_tiny", "--tokens", "16", "--device", "cpu", "--batch-size", "2",
                       "--rounds", "1", "--round-time", "0.01", env=env, check=True, fresh_process=True)
        assert "| glibc malloc" in proc.stdout.splitlines()[0]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("name", ["jemalloc", "tcmalloc_minimal"])
@pytest.mark.slow
def test_a_preloaded_allocator_is_named(name):
    lib = ctypes.util.find_library(name)
    if lib is None:
        pytest.skip(f"lib{name} is not installed (apt-get install libjemalloc2 / libtcmalloc-minimal4)")
    info = json.loads(run_cli("env", "--json", env={"LD_PRELOAD": lib}, check=True, fresh_process=True).stdout)
    assert info["memory_allocator"] == name.split("_")[0]
