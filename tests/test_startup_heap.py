"""Start-up objects out of the garbage collector's reach (``inferneo/startup_heap.py``), in processes Inferneo owns.

Each check runs in a fresh interpreter: freezing is per process, and the test process itself must not be frozen.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FREEZE_ONCE = textwrap.dedent("""
    import gc, json
    from inferneo.startup_heap import freeze_startup_heap
    kept = [[i] for i in range(20000)]  # long-lived objects made "at start-up"
    frozen = freeze_startup_heap("test")
    print(json.dumps({"returned": frozen, "freeze_count": gc.get_freeze_count(), "kept": len(kept)}))
""")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


@pytest.mark.parametrize("switch", ["1", "0"])
def test_freeze_moves_the_start_up_objects_to_the_permanent_generation(switch: str) -> None:
    import json

    done = _python(FREEZE_ONCE, INFERNEO_GC_FREEZE=switch)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if switch == "1":
        assert result["returned"] == result["freeze_count"] >= 20000  # the kept lists and everything imported
    else:
        assert result["returned"] == 0 and result["freeze_count"] == 0


CHILD_CORE = textwrap.dedent("""
    import asyncio, logging, sys
    from inferneo.config import EngineConfig
    from inferneo.engine.async_engine import AsyncEngine
    from inferneo.sampling_params import SamplingParams

    async def ask(engine):
        engine.start()
        async for out in engine.generate("Hello", SamplingParams(max_tokens=3, temperature=0), "r0"):
            last = out
        return last

    if __name__ == "__main__":
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # the core process logs at this level too
        engine = AsyncEngine.in_child_process(EngineConfig(model=sys.argv[1], num_threads=1))
        try:
            asyncio.run(ask(engine))
        finally:
            engine.shutdown()
        print("answered")
""")


@pytest.mark.parametrize("switch", ["1", "0"])
def test_the_engine_core_process_freezes_its_start_up_heap(tiny_llama_dir: Path, tmp_path: Path,
                                                           switch: str) -> None:
    script = tmp_path / "child_core.py"
    script.write_text(CHILD_CORE)
    done = subprocess.run([sys.executable, str(script), str(tiny_llama_dir)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "INFERNEO_GC_FREEZE": switch})
    assert done.returncode == 0 and "answered" in done.stdout, done.stderr[-3000:]
    # only the core's own process freezes: the caller's process (a library user's) is left alone
    frozen = re.findall(r"([A-Za-z][\w ()-]*?): (\d+) start-up objects moved", done.stderr)
    if switch == "1":
        assert [stage for stage, _ in frozen] == ["engine core"], done.stderr[-3000:]
        assert int(frozen[0][1]) > 10000
    else:
        assert frozen == []
