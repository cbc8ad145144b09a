"""``explore(model, images)``: the causal-tracing explorer, a Jupyter widget built on anywidget.

    widget = vp.explore(model, sample)         # display it: the last expression of a cell
    widget.corruption = "blur"; widget.selected_patch = 27
    widget.wait()                              # block until every view is exact
    widget.result.grid                         # the TraceResult behind the patch grid
    widget.to_html("explorer.html")            # the same linked views, offline, in one file

The kernel computes (:class:`~vitlens_patch.widgets.session.ExplorerSession`: the library's own
``trace_layers``, ``trace_grid`` and ``caap``); the browser only draws the JSON ``view`` trait.
Work runs in a background thread, so the kernel keeps answering: each change of a control is a
request with a new number, a newer request supersedes an older one (the running computation stops
at its next transformer block, unless the newer request needs it too), and every result is cached,
so going back to earlier settings redraws at once. Views appear with attribution-patching
estimates first and are replaced by the exact values as they arrive (``view["pending"]`` lists
what is still running; ``busy`` is true meanwhile).
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import threading
import time
import weakref
from pathlib import Path

import traitlets

try:
    import anywidget
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the explorer needs anywidget: pip install 'vitlens_patch[widget]' (or pip install anywidget)"
    ) from error

from vitlens_patch.model import HookedViT
from vitlens_patch.widgets.assets import explorer_css, explorer_esm, plotly_js_bytes
from vitlens_patch.widgets.export import write_explorer_html
from vitlens_patch.widgets.session import ExplorerResult, ExplorerSession, ExplorerSettings, Stage

# set at interpreter exit: running computations stop at their next block, so no worker thread is
# still inside torch while the interpreter shuts down
_SHUTDOWN = threading.Event()
_WORKERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    _SHUTDOWN.set()
    for worker in list(_WORKERS):
        worker.join(timeout=10)


_COMPUTE_TRAITS = ("image", "corruption", "kind", "window", "score", "target", "selected_patch", "caap_start", "caap_stop")


class Superseded(Exception):
    """Raised inside a computation whose request is no longer wanted."""


class ExplorerError(traitlets.TraitError, ValueError):
    """A bad setting or bad images: shown in the widget's ``error`` trait and raised."""


class Explorer(anywidget.AnyWidget):
    """The explorer widget; build it with :func:`explore`.

    Traits (synced with the browser): ``image``, ``corruption``, ``kind``, ``window``, ``score``,
    ``target`` (-1: the prediction), ``layer`` (the patch grid's layer), ``selected_patch`` (-1:
    none), ``caap_start`` / ``caap_stop`` (CAAP's block range), and, set by the kernel, ``view``
    (the JSON drawn), ``thumbnails``, ``options``, ``busy``, ``error``, ``request``.
    """

    _esm = explorer_esm()
    _css = explorer_css()

    image = traitlets.Int(0).tag(sync=True)
    corruption = traitlets.Unicode("grayscale").tag(sync=True)
    kind = traitlets.Unicode("attn").tag(sync=True)
    window = traitlets.Int(3).tag(sync=True)
    score = traitlets.Unicode("prob").tag(sync=True)
    target = traitlets.Int(-1).tag(sync=True)
    layer = traitlets.Int(0).tag(sync=True)
    selected_patch = traitlets.Int(-1).tag(sync=True)
    caap_start = traitlets.Int(0).tag(sync=True)
    caap_stop = traitlets.Int(0).tag(sync=True)

    view = traitlets.Dict().tag(sync=True)
    thumbnails = traitlets.List().tag(sync=True)
    options = traitlets.Dict().tag(sync=True)
    busy = traitlets.Bool(False).tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    request = traitlets.Int(0).tag(sync=True)
    static = traitlets.Bool(False).tag(sync=True)

    def __init__(self, session: ExplorerSession, **settings):
        self._session = session
        self._jobs: queue.Queue = queue.Queue()
        self._state = threading.Condition()
        self._request_id = 0
        self._done_id = 0
        self._failure: BaseException | None = None
        self._worker: threading.Thread | None = None
        self._ready = False
        # the worker never sends to the front end itself (comm messages from another thread during a
        # cell's execution leave the widget "Loading..."): it records what to show here and asks the
        # kernel's event loop, in the kernel's thread, to set the traits (_flush)
        self._shown: dict = {}
        self._kernel_thread = threading.get_ident()
        try:
            self._loop = asyncio.get_running_loop()  # in a Jupyter kernel: its event loop
        except RuntimeError:
            self._loop = None  # plain Python: no front end, traits are set from any thread
        n_layers = session.model.cfg.n_layers
        start, stop = session.caap_layers(ExplorerSettings())
        super().__init__(
            options=session.options(), thumbnails=session.thumbnails(), layer=n_layers // 2,
            window=min(3, n_layers), caap_start=start, caap_stop=stop,
        )
        self.on_msg(self._on_message)
        self._ready = True
        for name, value in settings.items():
            if name not in (*_COMPUTE_TRAITS, "layer"):
                raise ValueError(f"settings must be among {(*_COMPUTE_TRAITS, 'layer')}, got {name!r}")
            setattr(self, name, value)
        self.observe(self._on_change, names=list(_COMPUTE_TRAITS))
        self._submit()

    def _on_message(self, widget, content, buffers) -> None:
        """The front end asks for plotly.js once per page: answered with the plotly package's file."""
        if isinstance(content, dict) and content.get("type") == "plotly.js":
            self.send({"type": "plotly.js"}, buffers=[plotly_js_bytes()])

    # ------------------------------------------------------------------ settings and checks
    @property
    def session(self) -> ExplorerSession:
        return self._session

    @property
    def settings(self) -> ExplorerSettings:
        """The current :class:`ExplorerSettings`."""
        return ExplorerSettings(
            image=self.image, corruption=self.corruption, kind=self.kind, window=self.window, score=self.score,
            target=None if self.target < 0 else self.target, caap_layers=(self.caap_start, self.caap_stop),
        )

    @property
    def patch(self) -> int | None:
        return None if self.selected_patch < 0 else self.selected_patch

    def _fail(self, message: str) -> None:
        self.error = message
        raise ExplorerError(message)

    def set_state(self, sync_data):
        """Changes from the browser; a rejected value shows its error and the controls revert."""
        try:
            super().set_state(sync_data)
        except ExplorerError as error:
            self.error = str(error)
            self.send_state([name for name in sync_data if name in self.keys])

    @property
    def caap_layers(self) -> tuple[int, int]:
        """CAAP's block range (start, stop); set both at once with ``widget.caap_layers = (3, 9)``."""
        return self.caap_start, self.caap_stop

    @caap_layers.setter
    def caap_layers(self, layers: tuple[int, int]) -> None:
        start, stop = layers
        try:
            with self.hold_trait_notifications():
                self.caap_start, self.caap_stop = start, stop
        except ExplorerError as error:
            self.error = str(error)  # the held changes (this one too) were rolled back
            raise

    def _check(self, proposal_name: str, value):
        """Cross-check one proposed trait value against the session; show and raise any error."""
        if not getattr(self, "_ready", False):
            return value
        current = {name: getattr(self, name) for name in _COMPUTE_TRAITS}
        current[proposal_name] = value
        settings = ExplorerSettings(
            image=current["image"], corruption=current["corruption"], kind=current["kind"],
            window=current["window"], score=current["score"],
            target=None if current["target"] < 0 else current["target"],
            caap_layers=(current["caap_start"], current["caap_stop"]),
        )
        try:
            self._session.check(settings)
            self._session.check_patch(None if current["selected_patch"] < 0 else current["selected_patch"])
        except ValueError as error:
            self._fail(str(error))
        return value

    @traitlets.validate(*_COMPUTE_TRAITS)
    def _validate(self, proposal):
        return self._check(proposal["trait"].name, proposal["value"])

    def set_images(self, images, labels=None) -> None:
        """Explore other images (same model); bad images show an error here and raise ValueError."""
        try:
            session = ExplorerSession(self._session.model, images, labels, class_names=self._session.class_names)
        except ValueError as error:
            self._fail(str(error))
        with self.hold_trait_notifications():
            self._session = session
            self.thumbnails = session.thumbnails()
            self.image = 0
            self.selected_patch = -1
        self._submit()

    # ------------------------------------------------------------------------ the requests
    def _on_change(self, change) -> None:
        if change["name"] == "caap_start" and self.caap_start >= self.caap_stop:
            return  # mid-edit of the block range; the validator checked the pair
        self._submit()

    def _submit(self) -> None:
        """A new request for the current settings: drawn at once from the cache when complete,
        else drawn with what is cached and queued for the worker."""
        settings, patch = self.settings, self.patch
        with self._state:
            self._request_id += 1
            request = self._request_id
            self._failure = None
        self.request = request
        missing = self._session.missing(settings, patch)
        self._show(request, view=self._session.view(settings, patch), error="", busy=bool(missing))
        if not missing:
            self._finish(request)
            return
        self._jobs.put((request, settings, patch))
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="vitlens-explorer", daemon=True)
            _WORKERS.add(self._worker)
            self._worker.start()

    def _show(self, request: int, **traits) -> None:
        """Record trait values for ``request`` (dropped if it is no longer current) and set them in
        the kernel's thread."""
        with self._state:
            if request != self._request_id:
                return
            self._shown.update(traits)
            self._state.notify_all()
        if self._loop is None or threading.get_ident() == self._kernel_thread:
            self._flush()
        else:
            try:
                self._loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the loop is closed: no kernel to send to any more
                pass

    def _flush(self) -> None:
        with self._state:
            shown, self._shown = self._shown, {}
        for name in ("view", "error", "busy"):  # busy last: a finished view is drawn before the spinner stops
            if name in shown:
                setattr(self, name, shown[name])

    def _finish(self, request: int, error: str | None = None) -> None:
        with self._state:
            if request == self._request_id:
                self._done_id = request
        self._show(request, busy=False, **({} if error is None else {"error": error}))

    def _current(self, request: int) -> bool:
        with self._state:
            return request == self._request_id

    def _work(self) -> None:
        while not _SHUTDOWN.is_set():
            try:
                job = self._jobs.get(timeout=1)
            except queue.Empty:
                continue
            while not self._jobs.empty():  # only the newest request matters
                job = self._jobs.get_nowait()
            self._run(*job)

    def _run(self, request: int, settings: ExplorerSettings, patch: int | None) -> None:
        session = self._session
        try:
            for stage in session.missing(settings, patch):
                if not self._current(request):
                    return
                self._compute(session, stage, request)
                if self._current(request):
                    self._show(request, view=session.view(settings, patch))
        except Superseded:
            return
        except Exception as error:  # shown in the widget, re-raised by wait()
            with self._state:
                if request != self._request_id:
                    return
                self._failure = error
            self._finish(request, error=f"{type(error).__name__}: {error}")
            return
        self._finish(request)

    def _compute(self, session: ExplorerSession, stage: Stage, request: int) -> None:
        """Run one stage, stopping at the next block once no current request needs it."""
        worker = threading.get_ident()

        def check(module, args):
            if threading.get_ident() != worker:
                return
            if _SHUTDOWN.is_set() or (not self._current(request) and not self._wanted(stage)):
                raise Superseded(stage)

        handles = [block.register_forward_pre_hook(check) for block in session.model.blocks]
        try:
            session.compute(stage)
        finally:
            for handle in handles:
                handle.remove()

    def _wanted(self, stage: Stage) -> bool:
        """Whether the newest request needs ``stage`` too (then it goes on)."""
        return stage in self._session.stages(self.settings, self.patch)

    # ------------------------------------------------------------------------------ results
    def wait(self, timeout: float = 300.0, *, exact: bool = True) -> ExplorerResult:
        """Block until the current request is done (``exact=False``: until every view is drawn,
        estimates allowed); returns :attr:`result`. Raises the computation's error, or
        TimeoutError."""
        deadline = time.monotonic() + timeout
        try:
            with self._state:
                while True:
                    if self._failure is not None:
                        raise self._failure
                    if self._done_id == self._request_id:
                        break
                    if not exact and self._drawn(self._shown.get("view", self.view)):
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"the explorer did not finish within {timeout} s (pending: {self.view.get('pending')})"
                        )
                    self._state.wait(min(remaining, 0.5))
        finally:
            if threading.get_ident() == self._kernel_thread:
                self._flush()  # a cell blocked here keeps the event loop from doing it
        return self.result

    def _drawn(self, view: dict) -> bool:
        if not view or view.get("settings", {}).get("image") != self.image:
            return False
        needed = ["layers", "grid", "caap"] + (["patch"] if self.patch is not None else [])
        return all(view.get(name) is not None for name in needed) and (
            self.patch is None or view["patch"].get("effects") is not None
        )

    @property
    def result(self) -> ExplorerResult:
        """The current settings' results (exact where computed): ``layers`` and ``grid``
        TraceResults, the CAAP map, the selected patch's effects and CAAP value."""
        return self._session.result(self.settings, self.patch)

    def to_html(self, path: str | Path, *, images: str | list[int] = "current", progress: bool = False) -> Path:
        """Write the linked views of the current settings as one self-contained HTML file (plotly.js
        inlined, no network), every layer and patch precomputed exactly.

        Args:
            path: the HTML file to write.
            images: "current" (the selected image), "all", or a list of image indices.
            progress: print nothing by default; True shows a progress bar over the images.

        Returns:
            The path written.
        """
        if images == "current":
            indices = [self.image]
        elif images == "all":
            indices = list(range(self._session.n_images))
        else:
            indices = [int(i) for i in images]
        return write_explorer_html(
            self._session, self.settings, path, images=indices, patch=self.patch, layer=self.layer, progress=progress,
        )


def explore(model: HookedViT, images, labels=None, **settings) -> Explorer:
    """An interactive causal-tracing explorer of ``model`` on ``images`` (display it in Jupyter).

    Args:
        model: the HookedViT (with a classifier).
        images: normalised model input [batch, channel, height, width], uint8 images (resized by
            ``model.preprocess``) or :class:`~vitlens_patch.data.folder.LabelledImages`.
        labels: true class per image (optional; taken from LabelledImages).
        settings: initial trait values: ``image``, ``corruption`` ("grayscale", "blur",
            "pixel_noise", "patches", "embedding_noise"), ``kind`` ("attn", "mlp", "resid",
            "resid_pre"), ``window``, ``score`` ("prob", "logit", "logprob"), ``target``,
            ``selected_patch``, ``layer``, ``caap_start``, ``caap_stop``.

    Returns:
        The :class:`Explorer` widget; its first request is already running.

    Raises:
        ValueError: for images of the wrong size or an unknown setting (naming what is allowed).
    """
    return Explorer(ExplorerSession(model, images, labels), **settings)
