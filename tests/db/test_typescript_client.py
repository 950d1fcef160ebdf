"""The API from the platform's TypeScript side: a client generated from /openapi.json
(openapi-typescript + openapi-fetch, clients/typescript) compiles under tsc --strict and
sends one message and reads its job against a real `pgqueue serve`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pgqueue import admin
from tests.support.helpers import add_tenants, phone
from tests.support.serve import serving

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "typescript"
# npm's words for a registry it cannot reach: the machine is offline, not the client wrong.
OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNREFUSED", "ENETUNREACH")


def _run(argv: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the TypeScript client is not checked")
    done = _run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], CLIENT)
    if done.returncode != 0 and any(word in done.stderr for word in OFFLINE):
        pytest.skip(f"the npm registry cannot be reached: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    return CLIENT / "node_modules"


async def test_a_generated_typescript_client_sends_and_reads_its_job(
    node_modules: Path, db_url: str, conn: Any, tmp_path: Path
) -> None:
    await add_tenants(conn, 1)
    token = await admin.create_token(conn, "t0")
    work = tmp_path / "client"
    work.mkdir()
    for name in ("send.ts", "tsconfig.json", "package.json"):
        shutil.copy(CLIENT / name, work / name)
    (work / "node_modules").symlink_to(node_modules)
    bin_dir = node_modules / ".bin"
    async with serving(db_url, tmp_path) as (client, _proc, _log):
        base = str(client.base_url).rstrip("/")
        generated = _run(
            [str(bin_dir / "openapi-typescript"), f"{base}/openapi.json", "-o", "schema.d.ts"],
            work,
        )
        assert generated.returncode == 0, generated.stderr
        compiled = _run([str(bin_dir / "tsc"), "-p", "tsconfig.json"], work)
        assert compiled.returncode == 0, compiled.stdout + compiled.stderr
        ran = _run(["node", "build/send.js", base, token, phone(7)], work, timeout=60)
        assert ran.returncode == 0, ran.stderr
    answer = json.loads(ran.stdout)
    assert answer["tenantId"] == "t0" and answer["phone"] == phone(7)
    assert answer["state"] in ("waiting", "delayed") and answer["jobId"] >= 1
    row = await (
        await conn.execute(
            "SELECT tenant_id, to_number FROM pgqueue.jobs WHERE id = %s", (answer["jobId"],)
        )
    ).fetchone()
    assert row == {"tenant_id": "t0", "to_number": phone(7)}
