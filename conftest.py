"""Shared fixtures: a real nats-server and real local Antennas (API over HTTP), never mocks.

Cheap by design: nats-server starts in ~10 ms and is shared by the session;
a DevStack (SQLite file, uvicorn in a thread, its own NATS connection)
starts in well under a second, so each test gets a fresh one.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable, Iterator

import httpx
import pytest

from antenna_lab.antenna.admin import AntennaAdmin
from antenna_lab.antenna.costs import AntennaCosts
from antenna_lab.antenna.devstack import DevStack
from antenna_lab.antenna.streams import JobStreams
from antenna_lab.antenna.natsserver import EmbeddedNats
from antenna_lab.settings import ApiSettings, QueueSettings

StackFactory = Callable[..., DevStack]


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """One nats-server with JetStream (file store) for the whole session; ``.url`` to connect.

    Job ids repeat across tests: the API drops a leftover stream of the same
    id when it creates a job, so tests sharing this server do not see each
    other's tasks. Tests that stop or restart NATS must use their own
    (``stack_factory(own_nats=True)``).
    """
    server = EmbeddedNats(store_dir=tmp_path_factory.mktemp("nats")).start()
    yield server
    server.close()


@pytest.fixture
def stack_factory(nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackFactory]:
    """Make started DevStacks, all stopped at teardown.

    ``make(ack_wait_s=2.0, max_deliver=2, max_ack_pending=1000, own_nats=False,
    max_body_bytes=..., housekeeping_interval_s=0.2, register_kinds=("sim", "ami"),
    reap_dead_letters=False, save_workers=2, seed=0, costs=None)``: queue settings apply
    to the stack's jobs; ``own_nats=True`` gives the stack an embedded
    nats-server of its own (for NATS outages), else it uses ``nats_server``.
    Housekeeping (stats samples, and dead letters with ``reap_dead_letters``) runs every
    0.2 s so tests wait little. ``register_kinds``: the model kinds whose algorithms the
    stack pre-registers (a result naming any other algorithm is refused at save time).
    """
    stacks: list[DevStack] = []

    def make(
        ack_wait_s: float = 2.0,
        max_deliver: int = 2,
        max_ack_pending: int = 1000,
        own_nats: bool = False,
        max_body_bytes: int = 32 * 1024 * 1024,
        housekeeping_interval_s: float = 0.2,
        register_kinds: tuple[str, ...] = ("sim", "ami"),
        reap_dead_letters: bool = False,
        save_workers: int = 2,
        seed: int = 0,
        costs: AntennaCosts | None = None,
    ) -> DevStack:
        queue = QueueSettings(
            nats_url=None if own_nats else nats_server.url,
            nats_task_ttr=ack_wait_s,
            nats_max_deliver=max_deliver,
            nats_max_ack_pending=max_ack_pending,
            nats_store_dir=None,
        )
        api = ApiSettings(
            api_host="127.0.0.1",
            api_port=0,
            api_token="test-token",
            api_db_path=None,
            data_dir=tmp_path_factory.mktemp("stack"),
            api_max_body_bytes=max_body_bytes,
        )
        stack = DevStack(
            queue,
            api,
            housekeeping_interval_s=housekeeping_interval_s,
            register_kinds=register_kinds,
            reap_dead_letters=reap_dead_letters,
            save_workers=save_workers,
            seed=seed,
            costs=costs,
        )
        stacks.append(stack)
        return stack.start()

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture
def stack(stack_factory: StackFactory) -> DevStack:
    """A started DevStack on the session's nats-server: ack_wait 2 s, max_deliver 2, token ``test-token``."""
    return stack_factory()


@pytest.fixture
def admin(stack: DevStack) -> AntennaAdmin:
    """The admin client of ``stack`` (create, run, read, list, cancel jobs)."""
    return stack.admin


@pytest.fixture
def api(stack: DevStack) -> Iterator[httpx.Client]:
    """An httpx client on ``stack.api_url`` with its token: the worker's view of the API (paths like ``jobs/``)."""
    with httpx.Client(base_url=stack.api_url + "/", headers={"Authorization": f"Token {stack.token}"}, timeout=30) as client:
        yield client


@pytest.fixture
async def nats_queue(nats_server: EmbeddedNats) -> AsyncIterator[JobStreams]:
    """A JobStreams on the session's nats-server, to look at streams and consumers behind the API's back."""
    queue = await JobStreams.connect(nats_server.url, name="test-inspector")
    yield queue
    await queue.close()



@pytest.fixture(scope="session", autouse=True)
def stop_temporary_prefect_servers() -> Iterator[None]:
    """Stop every temporary Prefect server this session started, while pytest's streams are still open.

    Prefect stops a temporary server it started on its own (code that asked for a client with no
    ``PREFECT_API_URL``) at interpreter exit, logging through a handler bound to a stream pytest
    has closed by then: a ``ValueError: I/O operation on closed file`` traceback after the summary.
    """
    yield
    import sys

    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in set(SubprocessASGIServer._instances.values()):
            server.stop()


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[str]:
    """One Prefect test server per test module that asks for it (``prefect_test_harness`` takes ~12 s
    to start); yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())
