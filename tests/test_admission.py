"""Admission of task runs while the Prefect server lags: however many wait, one count at a time."""

from __future__ import annotations

import asyncio
from typing import Any

from cloudsend_prefect import running


class SlowServer:
    """Answers `/task_runs/count` after a delay, and catches up by 100 records per answer."""

    def __init__(self) -> None:
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.records = 0

    async def request(self, method: str, path: str, json: dict[str, Any]) -> Any:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        self.records += 50  # two counts per look: 100 more task runs seen and ended per look
        records = self.records

        class Response:
            def raise_for_status(self) -> None:
                pass

            def json(self) -> int:
                return records

        return Response()


def test_waiting_task_runs_share_one_count(monkeypatch: Any) -> None:
    monkeypatch.setattr(running, "LAG_CHECK", 0.01)
    server = SlowServer()

    async def scenario() -> int:
        recorder = running._Recorder(server, "00000000-0000-0000-0000-000000000001")  # type: ignore[arg-type]
        recorder.started = recorder.ended = running.MAX_BACKLOG  # the server has recorded nothing yet
        await asyncio.gather(*(recorder.admit() for _ in range(500)))
        return recorder.started

    started = asyncio.run(scenario())
    assert started == running.MAX_BACKLOG + 500
    assert server.most_in_flight == 1  # 500 waiters, never more than one count at the server
    assert server.calls < 100  # looks at the server as it catches up, not one per waiting task run per look
