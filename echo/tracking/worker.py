"""The process that writes runs to MLflow: `python echo/tracking/worker.py [--serve SOCKET]`.

Why a process of its own: docs/tracking.md. The training process (client.py) sends it one JSON
object per line on stdin, `op` naming it; when stdin closes with a run open (even by SIGKILL), the
run ends KILLED.

| op | fields | what the worker does | answer |
|---|---|---|---|
| start | uri, experiment, run_name, tags, params | creates the run, logs its params | run id/failed |
| metrics | rows [[name, step, value], ...], ms | buffers them; writes 1,000 per call (a service: 250), or 10 s |  |
| text | text, name | a text artifact |  |
| tags | tags | sets tags |  |
| params | params | logs more params (e.g. n_params) |  |
| curve | history, target, baseline (optional) | draws learning_curve.png |  |
| positions | accuracy, chance | draws token_acc_by_position.png |  |
| lengths | rows [[L, token acc, exact], ...], trained, chance | draws length_generalisation.png |  |
| artifacts | folder, path, remove | the folder's files under `path` (checkpoint) |  |
| provenance | argv | tags git commit, dirty diff, versions, device |  |
| where |  | (answers at once, also for a kept run) | experiment id |
| open | uri | opens the store before a run starts (the warm-up) |  |
| end | status, error | flushes, ends the run FINISHED/FAILED/KILLED | ended/unsent |

Answers are stdout lines starting with ANSWER (MLflow may print others there). A write the store
refuses is kept, with the rest of the run, in ./echo-unsent/<run>/ (outbox.py), and `end` answers
`unsent {"folder": ..., "why": ..., "lost": ...}`.

With `--serve SOCKET` it is a parallel sweep's tracking service (service.py): one connection per
training process, the same messages; a connection whose first message is a `sweep.` one carries
echo.sweeps.SweepStore's requests instead. One closed with its run (or sweep parent) open ends it KILLED.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import sys
import time
import traceback

if __name__ == "__main__":  # run as a script: its sibling modules, without importing the echo package
    import provenance
    import sweep_summary
    from outbox import Outbox, read, reason, unreachable
else:
    from echo.tracking import provenance, sweep_summary
    from echo.tracking.outbox import Outbox, read, reason, unreachable

ANSWER = "echo-tracking: "  # marks the answers on stdout
KEPT_TAGS = ("echo.kept_in", "echo.status")  # on a run ended FAILED, its rest kept locally: where, how it ended


def answer(text: str) -> None:
    print(ANSWER + text, flush=True)


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created if missing (tolerating a parallel creator)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another job created it first
        return client.get_experiment_by_name(name).experiment_id


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Figures drawn, by layout: the next run's figure of a layout, drawn with new data, takes about half
# the time. The last KEPT_FIGURES layouts stay open (pyplot warns past 20); a range set in `make` stays.
_figures: dict[tuple, tuple] = {}
KEPT_FIGURES = 8


def _with_data(key: tuple, make, data: list[tuple[list, list]]):
    """The figure `make()` (figure, lines) builds for `key`, its lines holding `data`, axes rescaled."""
    if key not in _figures:
        if len(_figures) >= KEPT_FIGURES:
            pyplot().close(_figures.pop(next(iter(_figures)))[0])
        _figures[key] = make()
    fig, lines = _figures[key]
    for line, (x, y) in zip(lines, data):
        line.set_data(x, y)
    for ax in fig.axes:
        ax.relim()
        ax.autoscale_view()
    return fig


def learning_curve(history: list[list], target: float, baseline: float | None = None):
    """Loss and accuracy against epochs; `baseline`: a loss drawn across (chance/loss)."""
    series: dict[str, tuple[list, list]] = {}
    for name, epoch, value in history:
        epochs, values = series.setdefault(name, ([], []))
        epochs.append(epoch)
        values.append(value)
    names = sorted(series)

    def make():
        fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 4))
        lines = [(ax_loss if name.endswith("loss") else ax_acc).plot([], [], label=name)[0] for name in names]
        ax_acc.axhline(target, color="grey", linestyle=":", label=f"target {target}")
        if baseline is not None:
            ax_loss.axhline(baseline, color="black", linestyle=":", label=f"chance/loss {baseline:.4g}")
        for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.legend()
        ax_loss.set_yscale("log")
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.2)  # tight_layout costs ~0.07 s
        return fig, lines

    return _with_data(("curve", tuple(names), target, baseline), make, [series[name] for name in names])


def length_generalisation(rows: list[list], trained: list[int], chance: float):
    """Token accuracy and exact match against window length, the trained lengths shaded, chance dotted."""
    lengths = [n for n, _, _ in rows]
    fig, ax = pyplot().subplots(figsize=(7, 4))
    ax.axvspan(trained[0] - 0.5, trained[1] + 0.5, color="C2", alpha=0.15, label=f"trained {trained[0]}-{trained[1]}")
    ax.plot(lengths, [token for _, token, _ in rows], "-o", ms=3, label="token accuracy")
    ax.plot(lengths, [exact for _, _, exact in rows], "-o", ms=3, label="exact match")
    ax.plot(lengths, [chance] * len(lengths), ":", color="grey", label=f"chance, token ({chance:.2g})")
    ax.plot(lengths, [chance**n for n in lengths], ":", color="black", label="chance, whole window")
    ax.set(xlabel="window length L (n_in = n_out = L)", ylabel="test accuracy", ylim=(-0.02, 1.02))
    ax.set_title("length generalisation")
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.92)
    return fig


def by_position(accuracy: list[float], chance: float):
    """Test token accuracy against output position."""

    def make():
        fig, ax = pyplot().subplots(figsize=(6, 3.5))
        (line,) = ax.plot([], [], "-o", ms=3, label="test/token_acc_by_position")
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance {chance:.3g}")
        ax.set(xlabel="output position (1 = oldest item of the window)", ylabel="token accuracy", ylim=(-0.02, 1.02))
        ax.legend(fontsize=8)
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.15, top=0.95)
        return fig, [line]

    return _with_data(("positions", len(accuracy), chance), make, [(range(1, len(accuracy) + 1), accuracy)])


def _sqlite_path(uri: str) -> str | None:
    return uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None


def new_client(uri: str):
    """An MLflow client for store `uri`. Two processes creating a new SQLite store's schema at once
    crash (`table ... already exists`): until it is complete, clients are made under a lock on its folder."""
    import fcntl
    import sqlite3

    from mlflow import MlflowClient

    path = _sqlite_path(uri)
    if path is None:
        return MlflowClient(uri)
    with (
        contextlib.suppress(sqlite3.Error),
        contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db,
    ):
        if db.execute("SELECT 1 FROM experiments WHERE experiment_id = 0").fetchone():  # MLflow creates it last
            return MlflowClient(uri)
    try:
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # no such folder: MLflow says so
        return MlflowClient(uri)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # released as it closes
        return MlflowClient(uri)
    finally:
        os.close(folder)


client = functools.cache(new_client)  # shared by a service's connections: opening one costs ~0.2 s


def open_store(uri: str) -> None:
    """Open an existing SQLite store now (about 1.5 s), ahead of the requests that need it."""
    path = _sqlite_path(uri)
    if path is None or not os.path.exists(path):
        return
    with contextlib.suppress(Exception):  # it fails again, saying so, when a request uses it
        client(uri).search_experiments(max_results=1)


class StoreRun:
    """A run in the store, taking an Outbox's calls; metrics are written in batches of `flush_rows`, or every 10 s."""

    def __init__(self, client, run_id: str, flush_rows: int = 1000):
        from mlflow.entities import Metric, Param, RunTag

        self.Metric, self.Param, self.RunTag = Metric, Param, RunTag
        self.client, self.run_id, self.flush_rows = client, run_id, flush_rows
        self.pending, self.last_flush = [], time.monotonic()

    def metrics(self, rows: list[tuple[str, float, int, int]]) -> None:
        self.pending += [self.Metric(name, value, ms, step) for name, value, ms, step in rows]
        if len(self.pending) >= self.flush_rows or time.monotonic() - self.last_flush > 10.0:
            self.flush()

    def flush(self) -> None:
        while self.pending:  # what is written leaves `pending`: a failure keeps only the rest
            self.client.log_batch(self.run_id, metrics=self.pending[:1000])
            del self.pending[:1000]
        self.last_flush = time.monotonic()

    def tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[self.RunTag(k, str(v)) for k, v in tags.items()])

    def params(self, params: dict[str, str]) -> None:
        items = [self.Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def figure(self, figure, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def artifacts(self, folder: str, path: str | None) -> None:
        self.client.log_artifacts(self.run_id, folder, path)

    def end(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)


def write(run, op: str, message: dict) -> None:
    """Write message `op` (the table above) into `run`: a StoreRun, or the Outbox keeping it."""
    if op == "metrics":
        run.metrics([(name, float(value), message["ms"], step) for name, step, value in message["rows"]])
    elif op == "text":
        run.text(message["text"], message["name"])
    elif op in ("tags", "params"):
        getattr(run, op)({k: str(v) for k, v in message[op].items()})
    elif op == "curve":
        run.figure(learning_curve(**message), "learning_curve.png")
    elif op == "positions":
        run.figure(by_position(**message), "token_acc_by_position.png")
    elif op == "lengths":
        figure = length_generalisation(**message)
        run.figure(figure, "length_generalisation.png")
        pyplot().close(figure)
    elif op == "artifacts":
        run.artifacts(message["folder"], message["path"])
        if message.get("remove"):
            shutil.rmtree(message["folder"], ignore_errors=True)
    elif op == "provenance":
        try:
            tags, diff = provenance.source_tags(message["argv"])
        except Exception:  # collected off the training process; none if it cannot be (the run goes on)
            traceback.print_exc()
            tags, diff = {}, ""
        run.tags(tags)
        if diff:
            run.text(diff, provenance.DIFF_ARTIFACT)
    elif op == "end":
        if message.get("error"):
            run.text(message["error"], "error.txt")
            run.tags({"echo.error": message["error"].strip().splitlines()[-1][:500]})
        run.end(message["status"])


class RunWriter:
    """Writes runs, one at a time. Once the store refuses a write, it and the run's later writes are
    kept locally (outbox.py); a run the store cannot create is answered `failed <why>`, nothing kept."""

    OPS = {"start", "metrics", "text", "tags", "params", "curve", "positions", "lengths", "artifacts", "provenance"}
    OPS |= {"where", "open", "end"}

    def __init__(self, reply=answer, service: bool = False):
        # A service loads matplotlib when idle, and writes metrics in smaller batches: many runs end at
        # once (a population's), and what each has not written by then is written while the sweep waits.
        self.reply, self.warm_up, self.flush_rows = reply, not service, 250 if service else 1000
        self.client, self.uri = None, None
        self.run, self.store, self.outbox = None, None, None  # no store: no run, or one the store could not create

    def handle(self, line: str) -> None:
        """Act on one message; `end` is answered once the run is written or kept."""
        message = json.loads(line)
        op = message.pop("op")
        if op not in self.OPS:
            raise ValueError(f"unknown tracking message {op!r}")
        if op == "start":
            self.start(**message)
        elif op == "where":  # for the run's page's address
            try:
                self.reply(self.client.get_run(self.store.run_id).info.experiment_id)
            except Exception:  # no run, or the store is gone: no address
                self.reply("")
        elif op == "open":  # while the training process imports torch
            open_store(message["uri"])
        elif self.store is None:  # nothing of it can be tracked
            if op == "artifacts" and message.get("remove"):
                shutil.rmtree(message["folder"], ignore_errors=True)
        else:
            self.write_or_keep(op, message)
        if op == "end":
            outbox, self.outbox, self.run, self.store = self.outbox, None, None, None
            self.reply("ended" if outbox is None else "unsent " + json.dumps(outbox.summary()))

    def start(self, uri, experiment, run_name, tags, params) -> None:
        self.store, self.outbox = None, None
        try:
            if uri != self.uri:
                self.client, self.uri = client(uri), uri
            created = self.client.create_run(experiment_id(self.client, experiment), run_name=run_name, tags=tags)
            self.store = StoreRun(self.client, created.info.run_id, self.flush_rows)
        except Exception as error:
            self.reply("failed " + reason(error))
            return
        self.run = dict(uri=uri, experiment=experiment, run_name=run_name, tags=tags, params=params)
        self.run.update(run_id=self.store.run_id, params_written=False)
        self.reply(self.store.run_id)
        try:
            self.store.params(params)
            self.run["params_written"] = True
        except Exception as error:
            self.open_outbox(error)
        if self.warm_up:
            pyplot()  # load matplotlib now, while training runs, not at the end

    def abandon(self) -> None:
        """The training process went away without a word: end its run KILLED (or keep that locally)."""
        if self.store is not None:
            self.write_or_keep("end", {"status": "KILLED"})

    def write_or_keep(self, op: str, message: dict) -> None:
        if self.outbox is None:
            try:
                write(self.store, op, message)
                return
            except Exception as error:
                self.open_outbox(error)
                if op == "metrics":  # its rows were pending: the outbox has them
                    return
        write(self.outbox, op, message)
        if op == "end":
            self.end_in_store(message["status"])

    def open_outbox(self, error: BaseException) -> None:
        self.outbox = Outbox(self.run, reason(error))
        self.outbox.metrics([(m.key, m.value, m.timestamp, m.step) for m in self.store.pending])
        self.store.pending = []

    def end_in_store(self, status: str) -> None:
        """End a run kept locally in the store too, where it can be reached, so that it does not stay
        RUNNING: FAILED, tagged with its folder; `python -m echo.upload` then gives it `status`."""
        if unreachable(self.uri):  # a server that is gone: no minutes of retries
            return
        logging.disable(logging.CRITICAL)  # a store that refuses it again (a full disk): the run's line said why
        try:
            with contextlib.suppress(Exception):
                folder = self.outbox.folder
                self.store.tags({"echo.status": status} | ({"echo.kept_in": str(folder)} if folder else {}))
            with contextlib.suppress(Exception):
                self.client.set_terminated(self.store.run_id, "FAILED")
        finally:
            logging.disable(logging.NOTSET)


def create_parent(client, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """A sweep's parent run, tagged with the command that continues the sweep; its id."""
    run_id = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags).info.run_id
    client.set_tag(run_id, "echo.continue_with", f"python run.py -m resume={run_id}")
    return run_id


def reopen_parent(client, parent: str, tags: dict[str, str]) -> str:
    """A sweep's parent run RUNNING again with `tags`, its children left RUNNING ended KILLED; its id."""
    for run in sweep_summary.children(client, parent):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
    client.update_run(parent, status="RUNNING")
    StoreRun(client, parent).tags(tags)
    return parent


def finish_sweep(client, parent: str, objective: str, ignored: list[str], argv: list[str]) -> dict:
    """Tag the sweep's parent with its provenance and summary, and end it FINISHED, or FAILED if one
    of its jobs failed (a diverged job: the sweep went on); return its name, experiment and best child."""
    status = "FINISHED"
    try:
        tags, diff = provenance.source_tags(argv)
        parent_run = StoreRun(client, parent)
        parent_run.tags(tags)
        if diff:
            parent_run.text(diff, provenance.DIFF_ARTIFACT)
        summary = sweep_summary.summarize_sweep(client, parent, objective, ignored)
        if summary["failed"]:
            status = "FAILED"
    finally:
        client.set_terminated(parent, status)
    run = client.get_run(parent).info
    best = {key: summary.get(key) for key in ("children", "best_run", "best")}
    return {"name": run.run_name, "experiment": run.experiment_id, "status": status, **best}


def end_sweep(client, parent: str, status: str | None) -> str:
    """End a sweep's parent and its children still RUNNING with `status`, or, if None, as its children
    tell: KILLED if one ended KILLED, else FAILED if one ended FAILED, else KILLED."""
    runs = sweep_summary.children(client, parent)
    if status is None:
        statuses = {run.info.status for run in runs}
        status = "FAILED" if "FAILED" in statuses and "KILLED" not in statuses else "KILLED"
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status)
    client.set_terminated(parent, status)
    return status


class SweepRequests:
    """Does what echo.sweeps.SweepStore asks, in a store process (echo.sweeps.serve) or the sweep's
    tracking service. A parent created and not ended when the requests stop ends KILLED (`abandon`)."""

    def __init__(self, reply):
        self.reply, self.open_parent, self.uri = reply, None, None
        self.ops = {"sweep.create": create_parent, "sweep.reopen": reopen_parent}
        self.ops |= {"sweep.finish": finish_sweep, "sweep.end": end_sweep}

    def handle(self, line: str) -> None:
        request = json.loads(line)
        self.uri = request.pop("uri")
        op = request.pop("op")
        if op == "sweep.open":  # while the jobs are checked: it writes nothing
            open_store(self.uri)
            self.reply(json.dumps({"value": None}))
            return
        store = client(self.uri)
        try:
            value = self.ops[op](store, **request)
            self.open_parent = value if op in ("sweep.create", "sweep.reopen") else None
            self.reply(json.dumps({"value": value}))
        except Exception as error:
            self.reply(json.dumps({"error": reason(error)}))

    def abandon(self) -> None:
        if self.open_parent is not None:
            with contextlib.suppress(Exception):  # the store is gone: the launching process has said so
                end_sweep(client(self.uri), self.open_parent, "KILLED")


class Connection:
    """One training process's connection to the service, and the run it is writing."""

    def __init__(self, sock):
        self.sock, self.buffer = sock, b""
        self.writer = None  # a RunWriter; for the sweep's own requests (echo.sweeps.SweepStore), a SweepRequests

    def reply(self, text: str) -> None:
        with contextlib.suppress(OSError):  # it went away; its next read says so
            self.sock.sendall(f"{ANSWER}{text}\n".encode())

    def receive(self) -> bool:
        """Handle what arrived; False once the training process has closed the connection."""
        data = self.sock.recv(1 << 16)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if self.writer is None:
                sweep = json.loads(line)["op"].startswith("sweep.")
                self.writer = SweepRequests(self.reply) if sweep else RunWriter(reply=self.reply, service=True)
            self.writer.handle(line.decode())
        return bool(data)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.abandon()  # if the training process (or the sweep) went away without a word
        self.sock.close()


def serve(path: str) -> None:
    """The service on Unix socket `path`, until stdin closes (the sweep is over, or its process died)
    and then every connection has."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    answer("ready")
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to say; MLflow may print
    from mlflow import MlflowClient  # noqa: F401  (now, before the sweep's jobs start)

    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)
    accepting, connections, cold = True, 0, True
    while accepting or connections:
        events = selector.select(timeout=0 if cold else None)
        if cold and not events:  # a process's first figure costs ~0.2 s more than the next: drawn once idle
            learning_curve([["train/loss", 1, 1.0], ["train/loss", 2, 0.5]], 0.99).savefig(io.BytesIO(), format="png")
            cold = False
        for key, _ in events:
            if key.fileobj is listener:
                sock, _ = listener.accept()
                selector.register(sock, selectors.EVENT_READ, Connection(sock))
                connections += 1
            elif key.fileobj is sys.stdin:
                if not os.read(sys.stdin.fileno(), 1024):  # no more jobs will connect
                    selector.unregister(listener)
                    selector.unregister(sys.stdin)
                    listener.close()
                    accepting = False
            else:
                connection = key.data
                try:
                    open_ = connection.receive()
                except Exception:  # this run cannot be written; the others go on
                    traceback.print_exc()
                    open_ = False
                if not open_:
                    selector.unregister(connection.sock)
                    connections -= 1
                    try:
                        connection.close()
                    except Exception:
                        traceback.print_exc()


def main() -> None:
    # The training process decides how the run ends: Ctrl-C and SLURM's signals to a job's processes are its.
    for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    # A store that stops answering: a few retries, then the run's writes are kept locally, not minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # each retry's warning: the run's last line says it
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
    else:
        writer = RunWriter()
        from mlflow import MlflowClient  # noqa: F401  (now: the training process imports torch meanwhile)

        for line in sys.stdin:
            writer.handle(line)
        writer.abandon()  # if the training process went away without a word
    sys.stdout.flush()
    os._exit(0)  # all is written; skip tearing down mlflow, SQLAlchemy and matplotlib (~1 s)


if __name__ == "__main__":
    main()


def upload(folder: str, uri: str) -> str:
    """Write an outbox folder into the store at `uri`: into the run it was kept from where this store
    has it, else a new run; its id."""
    kept = read(folder)
    run, client = kept["run"], new_client(uri)
    run_id, params = run.get("run_id"), not run.get("params_written")
    try:
        client.get_run(run_id) if run_id else None
    except Exception:  # not in this store
        run_id = None
    if run_id is None:
        tags = {**run["tags"], "echo.uploaded_from": str(folder)}
        if run.get("run_id"):
            tags["echo.kept_run_id"] = run["run_id"]
        experiment = experiment_id(client, run["experiment"])
        run_id = client.create_run(experiment, run_name=run["run_name"], tags=tags).info.run_id
        params = True
    store = StoreRun(client, run_id)
    if params:
        store.params(run["params"])
    store.params(kept["params"])  # params sent after the run started (e.g. n_params)
    if kept["tags"]:
        store.tags(kept["tags"])
    store.metrics(kept["metrics"])  # written as it ends
    if kept["artifacts"] is not None:
        store.artifacts(str(kept["artifacts"]), None)
    store.end(kept["status"] or "KILLED")  # no end recorded: the process died
    for tag in KEPT_TAGS:  # complete now (RunWriter.end_in_store)
        with contextlib.suppress(Exception):
            client.delete_tag(run_id, tag)
    return run_id
