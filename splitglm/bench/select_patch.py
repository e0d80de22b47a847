"""paho past 1024 descriptors: a process that hosts many MQTT clients (``bench fanin``'s simulated devices).

paho's network loop waits in ``select.select``, which refuses descriptors
>= FD_SETSIZE (1024). Each client holds three (its socket and a wake-up
pair), so in a process with a few hundred clients every new connection
fails ("filedescriptor out of range", which paho takes for a lost
connection, forever). ``lift_select_limit`` gives paho's module a ``select``
made of ``poll``. An agent has one client and needs none of it.
"""

from __future__ import annotations

import select
from types import SimpleNamespace

import paho.mqtt.client as mqtt


def _poll_select(rlist, wlist, xlist, timeout=None):
    """``select.select`` for readability and writability, made of ``poll`` (no limit on descriptor numbers)."""
    poller, masks = select.poll(), {}
    for items, mask in ((rlist, select.POLLIN), (wlist, select.POLLOUT)):
        for item in items:
            fd = _fd(item)
            masks[fd] = masks.get(fd, 0) | mask
    for fd, mask in masks.items():
        poller.register(fd, mask)  # (a closed socket's -1 raises ValueError, as select does)
    events = dict(poller.poll(None if timeout is None else max(timeout, 0) * 1e3))
    broken = select.POLLERR | select.POLLHUP | select.POLLNVAL
    readable = [x for x in rlist if events.get(_fd(x), 0) & (select.POLLIN | broken)]
    writable = [x for x in wlist if events.get(_fd(x), 0) & (select.POLLOUT | broken)]
    return readable, writable, []


def _fd(item) -> int:
    return item if isinstance(item, int) else item.fileno()


def lift_select_limit() -> None:
    """Let this process's paho clients use descriptors numbered 1024 and up (see the module doc)."""
    mqtt.select = SimpleNamespace(select=_poll_select)
