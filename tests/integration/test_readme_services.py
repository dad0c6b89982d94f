"""The README's service examples work as written: every ``curl`` line of the block after the
``services-curl`` marker runs against real services (ports swapped for the test's), a real worker
and the real local stack, and answers 2xx JSON of the documented kind."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.dev.processes import WorkerProcess
from tests.integration.conftest import EnvFactory, ServiceFactory

README = Path(__file__).resolve().parents[2] / "README.md"
WorkerFactory = Callable[[dict[str, str]], WorkerProcess]


def readme_curl_lines() -> list[str]:
    text = README.read_text()
    block = text.split("<!-- services-curl", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("curl ")]


def _run(line: str) -> tuple[int, dict[str, object]]:
    argv = [*shlex.split(line), "-w", "\n%{http_code}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    body, _, status = out.rpartition("\n")
    return int(status), json.loads(body)


def test_readme_curl_examples_work(test_env: EnvFactory, worker_factory: WorkerFactory,
                                   service_factory: ServiceFactory) -> None:
    lines = readme_curl_lines()
    assert len(lines) == 4, lines
    env = test_env(lanes="fraud,reco")
    worker_factory(env)
    fraud = service_factory("fraud-check", env)
    reco = service_factory("recommendations", env)
    answers = []
    for line in lines:
        line = line.replace("http://127.0.0.1:8081", fraud.url)
        line = line.replace("http://127.0.0.1:8082", reco.url)
        # A lookup follows a result topic: its answer may lag the call before it by some ms.
        deadline = time.monotonic() + 10
        status, body = _run(line)
        while status == 404 and re.search(r"/v1/(decisions|recommendations)/", line) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
            status, body = _run(line)
        assert status == 200, (line, body)
        answers.append(body)
    check, decision, fresh, stored = answers
    assert check["event_id"] == decision["event_id"] == "evt-1"
    assert decision["model_version"].startswith("fraud-")  # the pipeline scored it
    if not check["fallback"]:  # (a first call slower than the 50 ms budget gets the rules)
        assert (decision["decision"], decision["score"]) == (check["decision"], check["score"])
    assert len(fresh["items"]) == 3 and stored["source"] == "stored"
    if fresh["source"] == "pipeline":  # (likewise with the 100 ms deadline)
        assert stored["items"] == fresh["items"]
