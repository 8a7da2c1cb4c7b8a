"""Remote control of a serving worker: load another model revision without stopping (a rolling update).

Operators send Celery broadcast commands (`python -m tasks.control roll` does it worker by worker):

    kronos_load_model(model, predictor=None, revision=None)  start an update; the reply says it started
                                                           (or why it was refused)
    kronos_model_status()                                  the last update's state, and what is served

Celery runs control commands on the consumer's thread, so an update runs in its own thread and the reply
comes at once. Meanwhile the worker keeps serving the old engine. The new one is loaded beside it and
checked with a small smoke forecast; then it replaces the old one between two batches (ServingSlot), and the
old one is freed. If loading or the smoke forecast fails, the old engine keeps serving and the update's
state says why: in `kronos_model_status`'s reply, the log, the heartbeat's `model_update` field and
`kronos_model_updates_total{outcome="failed"}`.
"""

import logging
import threading
import time
import uuid
from collections.abc import Callable

from celery.worker.control import control_command

from worker import lifecycle
from worker.lifecycle import ServingModel, ServingSlot
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class ModelUpdater:
    """Runs one update at a time; `state()` is what the status command, the heartbeat and roll report."""

    def __init__(
        self,
        slot: ServingSlot,
        settings: WorkerSettings,
        max_pred_len: int,
        on_switched: Callable[[ServingModel, ServingModel], None],
        on_state: Callable[[dict], None],
    ):
        self.slot = slot
        self.settings = settings
        self.max_pred_len = max_pred_len
        self.on_switched = on_switched  # (old, new) after the switch: metrics and heartbeat name the new one
        self.on_state = on_state  # every change of the update's state
        self._state: dict | None = None
        self._lock = threading.Lock()

    def start(self, model: str | None, predictor: str | None, revision: str | None) -> dict:
        if model is not None and model != self.settings.model:
            return {"state": "refused", "error": f"this worker serves {self.settings.model!r}, not {model!r}"}
        with self._lock:
            if self._state is not None and self._state["state"] == "loading":
                return {"state": "refused", "error": f"update {self._state['id']} is still loading"}
            current = self.slot.current.engine.info
            self._state = {
                "id": uuid.uuid4().hex,
                "state": "loading",
                "predictor": predictor or self.settings.predictor,
                "revision": revision,
                "previous_revision": current.predictor_revision,
                "error": None,
                "started_at": time.time(),
                "finished_at": None,
            }
            state = dict(self._state)
        log.warning("model update %s: loading %s rev %s beside the old one", state["id"], state["predictor"], revision)
        self.on_state(state)
        threading.Thread(target=self._update, args=(state,), name="kronos-model-update", daemon=True).start()
        return state

    def state(self) -> dict:
        with self._lock:
            update = dict(self._state) if self._state else None
        info = self.slot.current.engine.info
        return {"serving": {"predictor": info.predictor, "revision": info.predictor_revision}, "update": update}

    def _update(self, state: dict) -> None:
        wanted = {"predictor": state["predictor"], "predictor_revision": state["revision"]}
        settings = self.settings.model_copy(update=wanted)
        try:
            serving = lifecycle.load(settings, max_pred_len=self.max_pred_len)
            lifecycle.check_forecast(serving.engine.forecast([lifecycle.smoke_series()]))
        except Exception as exc:
            log.error("model update %s failed; still serving the previous model: %s", state["id"], exc)
            self._finish(state, "failed", error=f"{type(exc).__name__}: {exc}")
            return
        previous = self.slot.swap(serving)
        device = previous.engine.device
        self.on_switched(previous, serving)
        del previous
        lifecycle.free_unreferenced_memory(device)
        info = serving.engine.info
        log.warning("model update %s: now serving %s rev %s", state["id"], info.predictor, info.predictor_revision)
        self._finish(state, "serving", revision=info.predictor_revision)

    def _finish(self, state: dict, outcome: str, **changes) -> None:
        with self._lock:
            self._state = {**state, **changes, "state": outcome, "finished_at": time.time()}
            finished = dict(self._state)
        self.on_state(finished)


_updater: ModelUpdater | None = None


def serve(updater: ModelUpdater | None) -> None:
    """Route the control commands of this process to `updater` (None: no model is served)."""
    global _updater
    _updater = updater


@control_command(
    args=[("model", str), ("predictor", str), ("revision", str)],
    signature="[model] [predictor] [revision]",
)
def kronos_load_model(state, model=None, predictor=None, revision=None):
    """Load another predictor or revision in the background and switch to it once it passed a smoke forecast."""
    if _updater is None:
        return {"state": "refused", "error": "no model is served yet"}
    return _updater.start(model, predictor, revision)


@control_command()
def kronos_model_status(state):
    """The served predictor and revision, and the last model update."""
    if _updater is None:
        return {"serving": None, "update": None}
    return _updater.state()
