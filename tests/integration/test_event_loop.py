"""``[server] event_loop``: lbgw runs on uvloop by default (it is installed), or as told."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbgw.testing import EchoBackend, echo_registrar, serve
from tests.integration.support import lbgw_process


def _loop_line(lines: list[dict[str, object]]) -> dict[str, object]:
    (line,) = [e for e in lines if e.get("event") == "event loop"]
    return line


@pytest.mark.parametrize(
    ("chosen", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio"), ("uvloop", "uvloop")]
)
async def test_lbgw_runs_on_the_loop_chosen(tmp_path: Path, chosen: str, expected: str) -> None:
    async with serve(echo_registrar(EchoBackend("a"))) as addr:
        config = tmp_path / "lbgw.toml"
        config.write_text(
            f'[server]\nevent_loop = "{chosen}"\n'
            '[[listeners]]\naddress = "127.0.0.1:0"\n'
            f'[clusters.c]\nendpoints = ["{addr}"]\n'
        )
        async with lbgw_process("--config", str(config)) as lbgw:
            assert _loop_line(lbgw.lines) == _loop_line(lbgw.lines) | {
                "loop": expected,
                "chosen": chosen,
            }
