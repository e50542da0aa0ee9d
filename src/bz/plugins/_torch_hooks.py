"""Torch hooks a plugin registers from inside its hooks are that plugin's.

While a plugin's hook runs, a torch hook it registers (on a module: forward pre, forward,
backward pre, backward, and their global forms; on a tensor: grad and post-accumulate
grad; on an optimizer: step pre and post, and their global forms) is registered
*guarded*: when torch calls it, it runs inside the sandbox's boundary under the plugin's
name (a fault in it is the plugin's: quarantined, rewound, training goes on), and
quarantining the plugin removes it.

How, and what it costs: while a :class:`PluginSet` trains (between :func:`adopt` and
:func:`release`), the registration methods of ``Module``, ``Tensor`` and ``Optimizer``
are replaced by wrappers, and torch's global hook tables (``torch.nn.modules.module``'s
and ``torch.optim.optimizer``'s) by tables that wrap what is written into them (once per
process, and only while empty; a table that already holds someone's hooks is left as it
is, and hooks registered there are not the plugin's). A wrapper reads which plugin runs
now (one attribute the sandbox writes anyway) and passes straight through when none
does. The sandbox's call path is unchanged: plugins that register nothing pay nothing.

Not seen: hooks written into a module's or tensor's hook dicts by hand, hooks on a
``grad_fn`` node, and hooks registered from a thread of the plugin's own.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

HookRunner = Callable[[Any, str, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
"""``(slot, kind, hook, args, kwargs)``: runs ``hook`` inside the sandbox's boundary."""

# (module, class, method, kind): the registration methods a plugin's hooks go through.
_METHODS = (
    ("torch.nn.modules.module", "Module", "register_forward_pre_hook", "forward_pre_hook"),
    ("torch.nn.modules.module", "Module", "register_forward_hook", "forward_hook"),
    ("torch.nn.modules.module", "Module", "register_full_backward_pre_hook", "backward_pre_hook"),
    ("torch.nn.modules.module", "Module", "register_full_backward_hook", "backward_hook"),
    ("torch.nn.modules.module", "Module", "register_backward_hook", "backward_hook"),
    ("torch._tensor", "Tensor", "register_hook", "grad_hook"),
    ("torch._tensor", "Tensor", "register_post_accumulate_grad_hook", "grad_hook"),
    ("torch.optim.optimizer", "Optimizer", "register_step_pre_hook", "optimizer_step_pre_hook"),
    ("torch.optim.optimizer", "Optimizer", "register_step_post_hook", "optimizer_step_post_hook"),
)

# (module, table, kind): torch's global hook tables (register_module_forward_hook & co.).
_TABLES = (
    ("torch.nn.modules.module", "_global_forward_pre_hooks", "forward_pre_hook"),
    ("torch.nn.modules.module", "_global_forward_hooks", "forward_hook"),
    ("torch.nn.modules.module", "_global_backward_pre_hooks", "backward_pre_hook"),
    ("torch.nn.modules.module", "_global_backward_hooks", "backward_hook"),
    ("torch.optim.optimizer", "_global_optimizer_pre_hooks", "optimizer_step_pre_hook"),
    ("torch.optim.optimizer", "_global_optimizer_post_hooks", "optimizer_step_post_hook"),
)


class HookLedger:
    """The torch hooks plugins of one :class:`PluginSet` registered, in order, by slot.

    ``running`` is the object the sandbox writes the running plugin's slot into (its
    watchdog); ``run`` calls a hook inside the boundary.
    """

    __slots__ = ("_entries", "_run", "_thread", "_watchdog", "touched")

    def __init__(self, watchdog: Any, run: HookRunner, touched: Callable[[], None]) -> None:
        self._watchdog = watchdog
        self._run = run
        self.touched = touched
        """Called before a running plugin changes autocast (see :mod:`._autocast`)."""
        self._thread = threading.get_ident()
        self._entries: list[tuple[object, Callable[[], object]]] = []

    def running_here(self) -> object | None:
        """The slot of the plugin whose hook runs now in the training thread, if any."""
        watchdog = self._watchdog
        if watchdog.running is None or threading.get_ident() != self._thread:
            return None
        call = watchdog.current()
        return None if call is None else call[0]

    def guard(self, slot: object, kind: str, hook: Callable[..., Any]) -> Callable[..., Any]:
        """``hook``, run inside the boundary as ``slot``'s whenever torch calls it."""
        run = self._run

        @functools.wraps(hook)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            return run(slot, kind, hook, args, kwargs)

        return guarded

    def record(self, slot: object, remove: Callable[[], object]) -> None:
        """Remember how to remove a hook ``slot`` registered."""
        self._entries.append((slot, remove))

    def mark(self) -> int:
        """How many hooks have been registered so far (for :meth:`drop_since`)."""
        return len(self._entries)

    def drop(self, slot: object) -> None:
        """Remove every hook ``slot`` registered (it was quarantined)."""
        kept = []
        for owner, remove in self._entries:
            if owner is slot:
                remove()
            else:
                kept.append((owner, remove))
        self._entries = kept

    def drop_since(self, mark: int) -> None:
        """Remove the hooks registered after :meth:`mark` returned ``mark`` (a rewind)."""
        for _owner, remove in self._entries[mark:]:
            remove()
        del self._entries[mark:]


_ledgers: list[HookLedger] = []
"""The ledgers of the plugin sets training now, innermost last."""
_originals: dict[tuple[Any, str], Any] = {}


def _current() -> HookLedger | None:
    return _ledgers[-1] if _ledgers else None


def _adopting(original: Callable[..., Any], kind: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def register(target: Any, hook: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        ledger = _current()
        slot = ledger.running_here() if ledger is not None else None
        if ledger is None or slot is None:
            return original(target, hook, *args, **kwargs)
        handle = original(target, ledger.guard(slot, kind, hook), *args, **kwargs)
        ledger.record(slot, handle.remove)
        return handle

    return register


def _touching(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def change(*args: Any, **kwargs: Any) -> Any:
        ledger = _current()
        if ledger is not None and ledger.running_here() is not None:
            ledger.touched()
        return original(*args, **kwargs)

    return change


class _AdoptingTable(OrderedDict[int, Any]):
    """A global hook table that makes what a plugin writes into it the plugin's."""

    kind = ""

    def __setitem__(self, key: int, value: Any) -> None:
        ledger = _current()
        slot = ledger.running_here() if ledger is not None else None
        if ledger is not None and slot is not None:
            value = ledger.guard(slot, self.kind, value)
            ledger.record(slot, functools.partial(self.pop, key, None))
        super().__setitem__(key, value)


def _install() -> None:
    from bz.plugins import _autocast  # noqa: F401  # keeps torch's own setter before wrapping

    for module_name, class_name, method, kind in _METHODS:
        cls = getattr(sys.modules[module_name], class_name)
        original = cls.__dict__[method]
        _originals[(cls, method)] = original
        setattr(cls, method, _adopting(original, kind))
    torch = sys.modules["torch"]
    autocast = sys.modules["torch.amp.autocast_mode"].autocast
    for owner, name in ((autocast, "__enter__"), (torch, "set_autocast_enabled")):
        original = getattr(owner, name)
        _originals[(owner, name)] = original
        setattr(owner, name, _touching(original))
    for module_name, table_name, kind in _TABLES:
        module = sys.modules[module_name]
        table = getattr(module, table_name)
        if type(table) is OrderedDict and not table:
            # Once per process: handles torch gave out hold the table they were given.
            adopting = _AdoptingTable()
            adopting.kind = kind
            setattr(module, table_name, adopting)


def _uninstall() -> None:
    for (cls, method), original in _originals.items():
        setattr(cls, method, original)
    _originals.clear()


def adopt(ledger: HookLedger) -> None:
    """Make hooks registered while ``ledger``'s plugins run theirs (torch imported)."""
    if "torch.optim.optimizer" not in sys.modules:
        import torch.optim  # noqa: F401  # loaded with torch; imported for its side tables

    if not _ledgers:
        _install()
    _ledgers.append(ledger)


def release(ledger: HookLedger) -> None:
    """Stop adopting for ``ledger``; the last one out puts torch's methods back."""
    if ledger in _ledgers:
        _ledgers.remove(ledger)
        if not _ledgers:
            _uninstall()


__all__ = ["HookLedger", "HookRunner", "adopt", "release"]
