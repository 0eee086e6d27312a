"""SyncMeshClient: MeshClient for blocking code, on a private event loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from agent_sdk._client import UNSET, MeshClient
from agent_sdk._types import (
    AgentInfo,
    MeshStats,
    RetryPolicy,
    StateEntry,
    TaskInfo,
    WorkflowInfo,
    WorkflowSpec,
)

__all__ = ["SyncMeshClient"]

T = TypeVar("T")


class SyncMeshClient:
    """Blocking twin of :class:`MeshClient` (without the watch iterators).

    It runs a private event loop in a daemon thread; every method blocks until
    the call completes. Use it as a context manager or call :meth:`close`.
    """

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *,
                 namespace: str = "default", timeout: float = 10.0) -> None:
        """Start the loop thread and create the async client on it."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="agentmesh-sync-client", daemon=True)
        self._thread.start()
        self._closed = False

        async def make() -> MeshClient:
            return MeshClient(target, namespace=namespace, timeout=timeout)

        try:
            self._client = self._run(make())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("SyncMeshClient is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kw: Any) -> T:
        return self._run(fn(*args, **kw))

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        """Close the client and stop the loop thread (safe to repeat)."""
        if self._closed:
            return
        try:
            self._run(self._client.aclose())
        finally:
            self._closed = True
            self._stop_loop()

    def __enter__(self) -> SyncMeshClient:
        """Return self."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close the client."""
        self.close()

    @property
    def namespace(self) -> str:
        """The namespace every call uses."""
        return self._client.namespace

    # tasks
    def submit_task(self, capability: str, input: Any = None, *,
                    priority: int = 0, labels: Mapping[str, str] | None = None,
                    task_id: str = "", request_id: str = "", retry: RetryPolicy | None = None,
                    timeout: float | None = None, fallback: str = "") -> TaskInfo:
        """See :meth:`MeshClient.submit_task`."""
        return self._call(self._client.submit_task, capability, input, priority=priority,
                          labels=labels, task_id=task_id, request_id=request_id, retry=retry,
                          timeout=timeout, fallback=fallback)

    def get_task(self, task: str) -> TaskInfo:
        """See :meth:`MeshClient.get_task`."""
        return self._call(self._client.get_task, task)

    def list_tasks(self, *, state: str | None = None, capability: str = "",
                   workflow: str = "", limit: int = 100) -> list[TaskInfo]:
        """See :meth:`MeshClient.list_tasks`."""
        return self._call(self._client.list_tasks, state=state, capability=capability,
                          workflow=workflow, limit=limit)

    def cancel_task(self, task: str, reason: str = "") -> TaskInfo:
        """See :meth:`MeshClient.cancel_task`."""
        return self._call(self._client.cancel_task, task, reason)

    def retry_task(self, task: str, input: Any = UNSET) -> TaskInfo:
        """See :meth:`MeshClient.retry_task`."""
        return self._call(self._client.retry_task, task, input)

    def wait_task(self, task: str, timeout: float | None = None) -> TaskInfo:
        """See :meth:`MeshClient.wait_task`."""
        return self._call(self._client.wait_task, task, timeout)

    def run_task(self, capability: str, input: Any = None, *,
                 wait_timeout: float | None = None, **kw: Any) -> Any:
        """See :meth:`MeshClient.run_task`."""
        return self._call(self._client.run_task, capability, input, wait_timeout=wait_timeout,
                          **kw)

    # workflows
    def submit_workflow(self, spec: WorkflowSpec | Mapping[str, Any], *, workflow_id: str = "",
                        request_id: str = "") -> WorkflowInfo:
        """See :meth:`MeshClient.submit_workflow`."""
        return self._call(self._client.submit_workflow, spec, workflow_id=workflow_id,
                          request_id=request_id)

    def get_workflow(self, name: str) -> WorkflowInfo:
        """See :meth:`MeshClient.get_workflow`."""
        return self._call(self._client.get_workflow, name)

    def wait_workflow(self, name: str, timeout: float | None = None) -> WorkflowInfo:
        """See :meth:`MeshClient.wait_workflow`."""
        return self._call(self._client.wait_workflow, name, timeout)

    def cancel_workflow(self, name: str, reason: str = "") -> WorkflowInfo:
        """See :meth:`MeshClient.cancel_workflow`."""
        return self._call(self._client.cancel_workflow, name, reason)

    def list_workflows(self, *, state: str | None = None, limit: int = 100) -> list[WorkflowInfo]:
        """See :meth:`MeshClient.list_workflows`."""
        return self._call(self._client.list_workflows, state=state, limit=limit)

    # agents
    def list_agents(self, *, capability: str = "", state: str | None = None,
                    labels: Mapping[str, str] | None = None,
                    limit: int = 1000) -> list[AgentInfo]:
        """See :meth:`MeshClient.list_agents`."""
        return self._call(self._client.list_agents, capability=capability, state=state,
                          labels=labels, limit=limit)

    def get_agent(self, name: str) -> AgentInfo:
        """See :meth:`MeshClient.get_agent`."""
        return self._call(self._client.get_agent, name)

    def stats(self) -> MeshStats:
        """See :meth:`MeshClient.stats`."""
        return self._call(self._client.stats)

    # state
    def get_state(self, key: str) -> StateEntry | None:
        """See :meth:`MeshClient.get_state`."""
        return self._call(self._client.get_state, key)

    def put_state(self, key: str, value: Any, *, expected_version: int | None = None,
                  ttl: float | None = None) -> StateEntry:
        """See :meth:`MeshClient.put_state`."""
        return self._call(self._client.put_state, key, value,
                          expected_version=expected_version, ttl=ttl)

    def delete_state(self, key: str, *, expected_version: int | None = None) -> int:
        """See :meth:`MeshClient.delete_state`."""
        return self._call(self._client.delete_state, key, expected_version=expected_version)

    def list_state(self, prefix: str = "", *, limit: int = 1000) -> list[StateEntry]:
        """See :meth:`MeshClient.list_state`."""
        return self._call(self._client.list_state, prefix, limit=limit)

    def update_state(self, key: str, fn: Callable[[Any | None], Any], *,
                     attempts: int = 10) -> StateEntry:
        """See :meth:`MeshClient.update_state` (``fn`` runs on the loop thread)."""
        return self._call(self._client.update_state, key, fn, attempts=attempts)

    # bus
    def publish(self, subject: str, value: Any, *,
                headers: Mapping[str, str] | None = None) -> None:
        """See :meth:`MeshClient.publish`."""
        self._call(self._client.publish, subject, value, headers=headers)
