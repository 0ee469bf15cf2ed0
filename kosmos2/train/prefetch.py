"""Making the next batches while the model trains on this one: in a thread (`BatchThread`) or in worker
processes (`BatchWorker`).

Both take `make(step)`, a pure function of the step (no global RNG drawn), so a run gets the same batches,
and ends on the same weights, with or without them: only where the time of making them goes changes. On the
2-core CPU the thread pays where worker processes did not (the batch's Pillow resizes, numpy and tokenizer
calls release the GIL and fill the moments the trainer's OpenMP threads leave a core idle; nothing to pickle
between processes: benchmarks/batch_worker.py, docs/DEFAULT_MODEL.md); a GPU, which would otherwise wait for
the CPU's batch or train faster than one core makes batches, wants worker processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class BatchThread:
    """`make(step)` for the next step made in a background thread while the model trains on this one.

    `get(step)` returns the batch of `step` and starts the next one (up to `end`); an error in the thread is
    raised there. Use as a context manager: on exit it waits for the batch in flight (at most one) and stops
    the thread."""

    def __init__(self, make: Callable[[int], Any], end: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._make, self._end = make, end
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kosmos2-batch")
        self._pending: tuple[int, Any] | None = None

    def get(self, step: int) -> Any:
        if self._pending is not None and self._pending[0] == step:
            batch = self._pending[1].result()
        else:  # the first step (or a step out of order): made here
            if self._pending is not None:
                self._pending[1].cancel()
            batch = self._make(step)
        nxt = step + 1
        self._pending = (nxt, self._pool.submit(self._make, nxt)) if nxt < self._end else None
        return batch

    def close(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> BatchThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BatchWorker:
    """`make(step)` for steps start, start + 1, ... made ahead in worker processes while the model trains.

    `make` must pickle (it is sent to spawned processes, which run it with one torch thread). Each worker
    keeps up to `ahead` batches ready; `get(step)` returns the next one, which must be for `step`. A failure
    in a worker is raised here, with its traceback. `workers` > 1 starts that many, worker k making steps
    start + k, start + k + workers, ... Use as a context manager (or call `close`): the workers are stopped
    on exit, and a worker whose trainer was killed ends by itself.
    """

    def __init__(
        self, make: Callable[[int], Any], start: int, end: int, ahead: int = 2, workers: int = 1
    ) -> None:
        import multiprocessing
        import pickle

        if ahead < 1:
            raise ValueError(f"BatchWorker ahead={ahead}: keep at least one batch ready")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"BatchWorker workers={workers!r}: use a positive number of worker processes")
        payload = pickle.dumps(make)
        context = multiprocessing.get_context("spawn")  # no fork of a process running OpenMP threads
        self._start, self._queues, self._processes = start, [], []
        for k in range(workers):
            q = context.Queue(maxsize=ahead)
            args = (q, payload, start + k, end, workers)
            process = context.Process(target=_worker, args=args, name=f"kosmos2-batches-{k}", daemon=True)
            process.start()
            self._queues.append(q)
            self._processes.append(process)

    def get(self, step: int) -> Any:
        import pickle
        import queue

        k = (step - self._start) % len(self._queues)
        source, process = self._queues[k], self._processes[k]
        while True:
            try:
                made, payload = source.get(timeout=5.0)
                break
            except queue.Empty:
                if not process.is_alive():
                    raise RuntimeError(
                        f"the batch worker stopped (exit code {process.exitcode}) before the batch of "
                        f"step {step}; run again without the worker (prefetch off) to see the error here"
                    ) from None
        if made is None:
            raise RuntimeError(f"the batch worker failed making the batch of step {step}:\n{payload}")
        if made != step:
            raise RuntimeError(f"the batch worker sent the batch of step {made}, expected step {step}")
        return pickle.loads(payload)

    def close(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.terminate()
        for process, q in zip(self._processes, self._queues, strict=True):
            process.join(timeout=10)
            q.close()
            q.cancel_join_thread()

    def __enter__(self) -> BatchWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker(out: Any, payload: bytes, start: int, end: int, every: int) -> None:
    """BatchWorker's process: one torch thread (the trainer has the cores), the batches of steps start,
    start + every, ... before end pickled in step order. When its steps are made it waits for the trainer to
    stop it; it ends by itself when the trainer is gone (killed: nobody left to stop it, and nobody to read
    what is still in the pipe)."""
    import multiprocessing
    import pickle
    import queue
    import traceback

    import torch

    trainer = multiprocessing.parent_process()

    def send(item: tuple[int | None, Any]) -> bool:
        while True:
            try:
                out.put(item, timeout=1.0)
                return True
            except queue.Full:
                if trainer is not None and not trainer.is_alive():
                    return False

    out.cancel_join_thread()  # at exit, do not wait to flush batches into a pipe that nobody reads
    torch.set_num_threads(1)
    step = start
    try:
        make = pickle.loads(payload)
        for step in range(start, end, every):
            if not send((step, pickle.dumps(make(step), protocol=pickle.HIGHEST_PROTOCOL))):
                return
    except Exception:
        send((None, f"step {step}: {traceback.format_exc()}"))
    if trainer is not None:
        trainer.join()  # the last batches are still in the pipe until the trainer reads them
