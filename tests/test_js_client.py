"""Runs the JavaScript client's own tests (node --test) against a real server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import pytest

from .helpers import ROOT, free_port, server_env

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_javascript_client(tmp_path, backends, make_group):
    group, _ = await make_group(["js-user"], songs=6, unique=True)
    other, _ = await make_group(["js-other"], songs=1)
    env = server_env(
        backends.database_url,
        backends.redis_url,
        tmp_path,
        TEST_GROUP=group,
        TEST_OTHER_GROUP=other,
        TEST_USER="js-user",
        TEST_PORT=free_port(),
        TEST_PYTHON=sys.executable,
        TEST_ROOT=ROOT,
        SMARTSORT_PROGRESS_INTERVAL_S=0,
        PATH=os.environ["PATH"],
        HOME=str(tmp_path),
    )
    proc = await asyncio.create_subprocess_exec(
        "node",
        "--experimental-websocket",
        "--no-warnings",
        "--test",
        "tests/js/",
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    text = out.decode()
    print(text[-2000:])
    assert proc.returncode == 0, text[-4000:]
    assert "# pass 5" in text and "# fail 0" in text
