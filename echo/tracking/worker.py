"""The process that writes runs to MLflow: `python echo/tracking/worker.py [--serve SOCKET]`.

The training process starts it first thing and sends it JSON lines on stdin; it imports
mlflow, creates the run and writes metrics in batches on the other CPU core while training
runs, so tracking costs training almost nothing. The training process keeps it for its next
run (echo/tracking/client.py), so a sweep's jobs pay for the import once. If the training process
dies without saying how the run ended (killed, even with SIGKILL), stdin closes and the run
ends KILLED.

Messages, one JSON object per line, `op` naming the `RunWriter` method that handles it
(`RunWriter.OPS`):

| op      | fields                                  | what the worker does                          | answer         |
|---------|-----------------------------------------|-----------------------------------------------|----------------|
| start   | uri, experiment, run_name, tags, params | creates the run, logs its params              | the run id     |
| metrics | rows [[name, step, value], ...], ms     | buffers them; writes 1,000 per call, or 10 s  |                |
| text    | text, name                              | a text artifact                               |                |
| tags    | tags                                    | sets tags                                     |                |
| params  | params                                  | logs more params (e.g. n_params)              |                |
| curve   | history, target                         | draws learning_curve.png                      |                |
| positions | accuracy, chance                      | draws token_acc_by_position.png               |                |
| lengths | rows [[L, token acc, exact], ...], trained [lo, hi], chance | draws length_generalisation.png |  |
| end     | status, error                           | flushes, ends the run FINISHED/FAILED/KILLED  | `ended`        |

Answers are lines of stdout starting with ANSWER (MLflow may print other lines there).

With `--serve SOCKET` it is a parallel sweep's tracking service instead (echo/tracking/service.py):
it writes the runs of all the sweep's local jobs at once, each training process on its own
connection to the Unix socket, with the same messages and answers; a connection that closes
with its run open ends that run KILLED. The jobs pay for no mlflow import, and the service
pays for its own while the sweep starts, on an otherwise idle core.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

ANSWER = "echo-tracking: "  # marks the answers on stdout


def answer(text: str) -> None:
    """Answer the training process that started this worker (on stdout)."""
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
    """matplotlib.pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curve(history: list[list], target: float):
    """Loss and accuracy against epochs, as a matplotlib figure."""
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 4))
    series: dict[str, tuple[list, list]] = {}
    for name, epoch, value in history:
        epochs, values = series.setdefault(name, ([], []))
        epochs.append(epoch)
        values.append(value)
    for name, (epochs, values) in sorted(series.items()):
        (ax_loss if name.endswith("loss") else ax_acc).plot(epochs, values, label=name)
    ax_acc.axhline(target, color="grey", linestyle=":", label=f"target {target}")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    ax_loss.set_yscale("log")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.2)  # tight_layout costs ~0.07 s
    return fig


def length_generalisation(rows: list[list], trained: list[int], chance: float):
    """Token accuracy and exact match against window length, the trained lengths shaded, chance
    dotted (a token: `chance`; a whole window of L: chance ** L), as a matplotlib figure."""
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
    """Test token accuracy against output position, as a matplotlib figure."""
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    positions = range(1, len(accuracy) + 1)
    ax.plot(positions, accuracy, "-o", ms=3, label="test/token_acc_by_position")
    ax.axhline(chance, color="grey", linestyle=":", label=f"chance {chance:.3g}")
    ax.set(xlabel="output position (1 = oldest item of the window)", ylabel="token accuracy", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.15, top=0.95)
    return fig


class RunWriter:
    """Writes runs, one at a time: params at the start, metrics in batches, artifacts, the status."""

    # the messages (table above)
    OPS = frozenset({"start", "metrics", "text", "tags", "params", "curve", "positions", "lengths", "end"})

    def __init__(self, flush_every_s: float = 10.0, reply=answer):
        self.flush_every_s, self.pending, self.run_id, self.reply = flush_every_s, [], None, reply
        self.client, self.uri = None, None

    def handle(self, line: str) -> None:
        """Act on one message; answer `end` once the run is written (`start` is answered early)."""
        message = json.loads(line)
        op = message.pop("op")
        if op not in self.OPS:
            raise ValueError(f"unknown tracking message {op!r}")
        getattr(self, op)(**message)
        if op == "end":
            self.reply("ended")  # the training process may report the run done now

    def start(self, uri, experiment, run_name, tags, params) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        self.Metric, self.RunTag, self.Param = Metric, RunTag, Param
        if uri != self.uri:
            self.client, self.uri = MlflowClient(uri), uri
        self.pending = []
        run = self.client.create_run(experiment_id(self.client, experiment), run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self.reply(self.run_id)
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.last_flush = time.monotonic()
        pyplot()  # load matplotlib now, while training runs, not at the end

    def metrics(self, rows, ms) -> None:
        self.pending += [self.Metric(name, float(value), ms, step) for name, step, value in rows]
        if len(self.pending) >= 1000 or time.monotonic() - self.last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        self.pending, self.last_flush = [], time.monotonic()

    def text(self, text, name) -> None:
        self.client.log_text(self.run_id, text, name)

    def tags(self, tags) -> None:
        self.client.log_batch(self.run_id, tags=[self.RunTag(k, str(v)) for k, v in tags.items()])

    def params(self, params) -> None:
        self.client.log_batch(self.run_id, params=[self.Param(k, v) for k, v in params.items()])

    def positions(self, accuracy, chance) -> None:
        figure = by_position(accuracy, chance)
        self.client.log_figure(self.run_id, figure, "token_acc_by_position.png")
        pyplot().close(figure)

    def curve(self, history, target) -> None:
        figure = learning_curve(history, target)
        self.client.log_figure(self.run_id, figure, "learning_curve.png")
        pyplot().close(figure)

    def lengths(self, rows, trained, chance) -> None:
        figure = length_generalisation(rows, trained, chance)
        self.client.log_figure(self.run_id, figure, "length_generalisation.png")
        pyplot().close(figure)

    def end(self, status, error=None) -> None:
        try:
            self.flush()
            if error:
                self.text(error, "error.txt")
                self.tags({"echo.error": error.strip().splitlines()[-1][:500]})
        finally:
            self.client.set_terminated(self.run_id, status)
            self.run_id = None


class Connection:
    """One training process's connection to the service, and the run it is writing."""

    def __init__(self, sock):
        self.sock, self.buffer = sock, b""
        self.writer = RunWriter(reply=self.reply)

    def reply(self, text: str) -> None:
        try:
            self.sock.sendall(f"{ANSWER}{text}\n".encode())
        except OSError:  # it went away; its next read says so
            pass

    def receive(self) -> bool:
        """Handle what arrived; False once the training process has closed the connection."""
        data = self.sock.recv(1 << 16)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self.writer.handle(line.decode())
        return bool(data)

    def close(self) -> None:
        if self.writer.run_id is not None:  # the training process went away without a word
            self.writer.end("KILLED")
        self.sock.close()


def serve(path: str) -> None:
    """The service: runs from every connection to the Unix socket `path`, until stdin closes (the
    sweep is over, or its process died) and then every connection has."""
    import selectors
    import socket
    import traceback

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    answer("ready")
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to say; MLflow may print
    from mlflow import MlflowClient  # noqa: F401  (now, before the sweep's jobs start)

    pyplot()
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)
    accepting, connections = True, 0
    while accepting or connections:
        for key, _ in selector.select():
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the training process decides how the run ends
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
    else:
        writer = RunWriter()
        for line in sys.stdin:
            writer.handle(line)
        if writer.run_id is not None:  # the training process went away without a word
            writer.end("KILLED")
    sys.stdout.flush()
    os._exit(0)  # all is written; skip tearing down mlflow, SQLAlchemy and matplotlib (~1 s)


if __name__ == "__main__":
    main()
