"""`fedit supernode`: Flower's own SuperNode with a cheap round.

Run as `flower-supernode` is (the same arguments), it changes two things on the critical path
of every message, both measured in docs/benchmarks.md:

- **No process per message.** Flower 1.41's SuperNode starts a SuperExec that polls every
  second for work and starts a fresh `flwr-clientapp` process per message (about 1 s of
  Python imports each), which then moves the message in and the reply out over the node's
  Runtime API, an HTTP request per object. Here the SuperNode runs in process isolation
  (`--isolation process`) and a long-running executor thread in the same process takes each
  message's task, runs the ClientApp loaded once (per app) and stores its reply: the steps of
  Flower's `flwr-clientapp`, with Flower's own Runtime API handlers called on the SuperNode's
  state in this process instead of over HTTP.
- **Short waits.** The SuperNode waits 3 s after every empty pull from the SuperLink and polls
  for the ClientApp's reply every 0.5 s (fixed in Flower's code). Here the executor and the
  SuperNode wake each other on events (a message stored, a reply pushed); toward the SuperLink
  a node asks again after `FEDIT_NODE_POLL_INTERVAL` seconds (default 0.05) when it has just
  answered, after a twentieth of its idle time (at most 1 s) when idle longer; Flower's
  retries for a message's objects that have not arrived yet start at a fifth of the poll, not
  at 1 s (also in fedit's ServerApp).

The ClientApp is still Flower's (fedit's shim, whose node worker holds the model), the
messages still go SuperLink -> SuperNode -> ClientApp and back, and a node started with plain
`flower-supernode` still works with the same server (only slower).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from logging import ERROR
from typing import Any

POLL_ENV = "FEDIT_NODE_POLL_INTERVAL"
DEFAULT_POLL = 0.05


IDLE_POLL_MAX = 1.0  # the longest wait between pulls of a node idle for a long time


def poll_interval() -> float:
    """`FEDIT_NODE_POLL_INTERVAL` in seconds (DEFAULT_POLL when unset), checked."""
    raw = os.environ.get(POLL_ENV, "").strip()
    try:
        poll = float(raw) if raw else DEFAULT_POLL
    except ValueError:
        poll = -1.0
    if not 0 < poll <= IDLE_POLL_MAX:
        raise ValueError(f"{POLL_ENV}={raw!r}: want seconds in (0, {IDLE_POLL_MAX:g}]")
    return poll


def local_wait(poll: float) -> float:
    """The first retry for a message's objects not there yet: a fifth of the poll."""
    return poll / 5


class Waits:
    """The SuperNode's waits, on events where the executor thread in this process can say
    when to stop waiting, and short where only the SuperLink knows:

    - after an empty pull from the SuperLink (Flower: 3 s): a twentieth of the time the node
      has been idle, between `poll` and IDLE_POLL_MAX (a node that just answered asks again
      within `poll`; one idle for a minute asks about once a second, so polls cost little CPU
      and add about 2.5% of the idle time to when it sees the next round's message);
    - for the ClientApp's reply (Flower: polls every 0.5 s): until the executor has pushed it;
    - the executor, for the next task: until the SuperNode has stored a message.
    """

    def __init__(self, poll: float) -> None:
        self.poll = poll
        self.idle_since: float | None = None
        self.task_ready = threading.Event()
        self.reply_ready = threading.Event()

    def sleep(self, seconds: float) -> None:
        if seconds >= 1:  # after an empty pull from the SuperLink
            now = time.monotonic()
            self.idle_since = self.idle_since or now
            time.sleep(min(IDLE_POLL_MAX, max(self.poll, (now - self.idle_since) / 20)))
        else:  # the reply (or its objects) not in the node's store yet
            self.reply_ready.wait(min(float(seconds), 0.5))
            self.reply_ready.clear()

    def pulled(self, run_id: int | None) -> int | None:
        if run_id is not None:  # a message is in: a task for the executor
            self.idle_since = None
            self.task_ready.set()
        return run_id

    def install(self) -> None:
        """Into Flower's SuperNode loop: its sleeps go through the module's `time`, and it
        pulls each message through `_pull_and_store_message`."""
        from flwr.supernode import start_client_internal as sci

        module = types.ModuleType("time")
        module.__dict__.update(time.__dict__)
        module.__dict__["sleep"] = self.sleep
        sci.__dict__["time"] = module
        pull = sci._pull_and_store_message
        sci.__dict__["_pull_and_store_message"] = lambda *a, **kw: self.pulled(pull(*a, **kw))


def fast_pulls(first_retry: float) -> None:
    """Flower pulls a message's objects with retries whose first wait is 1 s when an object
    is not there yet (the SuperNode, or the SuperLink, still receiving it): start them at
    `first_retry` instead (the cap on later retries stays Flower's)."""
    import inspect

    from flwr.supercore.inflatable import inflatable_utils as iu

    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        names = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.default is not inspect.Parameter.empty and p.kind != p.KEYWORD_ONLY
        ]
        if fn.__defaults__ and "initial_backoff" in names:
            defaults = list(fn.__defaults__)
            defaults[names.index("initial_backoff")] = first_retry
            fn.__defaults__ = tuple(defaults)
        if fn.__kwdefaults__ and "initial_backoff" in fn.__kwdefaults__:
            fn.__kwdefaults__["initial_backoff"] = first_retry


class LocalRuntime:
    """The SuperNode's Runtime API called in this process: the methods of Flower's
    `RuntimeHttpClient` that a ClientApp task uses, each authenticating the task by its token
    and running Flower's own handler on the SuperNode's state, as the HTTP route does, without
    the HTTP request (about 25 of them a message, each a few ms of CPU beside the training)."""

    def __init__(self, state: Any, token: str = "") -> None:
        self.state = state
        self.token = token

    def _call(self, handler: Callable[..., Any], request: Any) -> Any:
        from flwr.supercore.error import ApiErrorCode, FlowerError

        task = self.state.get_task_by_token(self.token) if self.token else None
        if task is None:
            raise FlowerError(
                ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED,
                "Runtime task-token authentication failed.",
            )
        return handler(request, self.state, task)

    def AcquireTask(self, request: Any) -> Any:  # Flower's method names
        from flwr.supernode.servicer.runtime import runtime_handlers as h

        return h.acquire_task(request, self.state)

    def for_task(self, token: str) -> LocalRuntime:
        return LocalRuntime(self.state, token)

    def __getattr__(self, name: str) -> Callable[[Any], Any]:
        """SendTaskHeartbeat, PullTaskInput, PullMessages, PullObject, ConfirmMessageReceived,
        PushMessages, PushObject, PushTaskOutput: the handler of the same name."""
        from flwr.supercore.servicer.runtime import runtime_handlers as core
        from flwr.supernode.servicer.runtime import runtime_handlers as h

        snake = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
        handler = getattr(h, snake, None) or getattr(core, snake, None)
        if not name[:1].isupper() or handler is None:
            raise AttributeError(name)
        return lambda request: self._call(handler, request)


def capture_state(found: list[Any], ready: threading.Event) -> None:
    """Keep the SuperNode's NodeState (one per process: its factory makes it once) for the
    executor."""
    from flwr.supernode.nodestate import NodeStateFactory

    make = NodeStateFactory.state

    def state(self: Any) -> Any:
        got = make(self)
        if not found:
            found.append(got)
            ready.set()
        return got

    NodeStateFactory.state = state  # type: ignore[method-assign]


def run_task(runtime: LocalRuntime, apps: dict[str, Any]) -> None:
    """One message's task, as `flwr-clientapp --token` runs it, in this process."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    client: Any = runtime
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        if fab.hash_str not in apps:  # install and import the app once, keep it loaded
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        reply = apps[fab.hash_str](message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # the reply carries the error, as flwr-clientapp's does
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client, context, status, details)
            heartbeat.stop()


def executor(found: list[Any], ready: threading.Event, waits: Waits, stop: threading.Event) -> None:
    """Take the node's ClientApp tasks one after another until `stop` (the SuperNode runs one
    message at a time)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore import log
    from flwr.supercore.constant import TaskType

    from fedit.engines.flower import node

    node.WATCH_PID = os.getpid()  # the node worker outlives tasks, not this SuperNode
    while not ready.wait(1.0):
        if stop.is_set():
            return
    runtime = LocalRuntime(found[0])
    apps: dict[str, Any] = {}
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    while not stop.is_set():
        waits.task_ready.clear()
        try:
            res = runtime.AcquireTask(request)
        except Exception as ex:  # the state going down with the SuperNode
            log(ERROR, "fedit executor: AcquireTask failed: %s", ex)
            time.sleep(1.0)
            continue
        if res.HasField("task") and res.token:
            run_task(runtime.for_task(res.token), apps)
            waits.reply_ready.set()
        else:
            waits.task_ready.wait(1.0)  # woken by the next stored message


def main(argv: Sequence[str] | None = None) -> int:
    """`fedit supernode ARGS...`: flower-supernode with these arguments, and the cheap round."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--isolation" or a.startswith("--isolation=") for a in argv):
        raise SystemExit("fedit supernode: runs its own ClientApp executor; drop --isolation")
    argv += ["--isolation", "process"]
    try:
        poll = poll_interval()
    except ValueError as e:
        raise SystemExit(f"fedit supernode: {e}") from None
    waits = Waits(poll)
    waits.install()
    fast_pulls(local_wait(poll))
    found: list[Any] = []
    ready, stop = threading.Event(), threading.Event()
    capture_state(found, ready)
    threading.Thread(target=executor, args=(found, ready, waits, stop), daemon=True).start()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    try:
        flower_supernode()
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
