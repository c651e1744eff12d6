"""Run one function per item in worker processes, each with a wall-clock limit.

A pool like concurrent.futures cannot kill one stuck task, and decord can hang inside C code holding the GIL on
files whose frame count is wrong; so every item gets its own forked process, which is killed when it overruns
and also dies with its parent (PR_SET_PDEATHSIG), leaving no orphan writing into the workspace after a kill.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import multiprocessing.connection
import signal
import sys
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator


def one_line(exc: BaseException) -> str:
    """dfpipe's own errors already read as reasons; anything else is prefixed by its type."""
    text = " ".join(str(exc).split())
    if type(exc).__module__.startswith("dfpipe.") and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _child(fn: Callable, item: Any, conn) -> None:
    # Ctrl-C reaches the whole process group; it is the parent's to handle (it kills the workers and exits), not a
    # reason to record this item as failed. The parent blocked it across the fork: ignore it, then unblock.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _die_with_parent()
    try:
        result = (True, fn(item))
    except BaseException as e:  # noqa: BLE001 - every failure becomes the unit's recorded reason
        result = (False, one_line(e))
    try:
        conn.send(result)
    except Exception as e:  # noqa: BLE001 - e.g. an unpicklable result
        conn.send((False, f"worker could not return its result: {one_line(e)}"))
    conn.close()


def run_parallel(fn: Callable[[Any], Any], items: Iterable[Any], *, workers: int,
                 timeout: float | None) -> Iterator[tuple[Any, bool, Any]]:
    """Yield ``(item, ok, result or one-line reason)`` in completion order; workers=0 runs in this process."""
    if workers <= 0:
        for item in items:
            try:
                yield item, True, fn(item)
            except Exception as e:  # noqa: BLE001
                yield item, False, one_line(e)
        return
    ctx = mp.get_context("fork")
    queue = deque(items)
    running: dict = {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                item = queue.popleft()
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(fn, item, send), daemon=True)
                # A Ctrl-C during the fork would land in Python's after-fork hooks, where it is only printed
                # ("Exception ignored") and the run goes on: held back until the fork is done.
                mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    proc.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                send.close()
                running[recv] = (proc, item, time.monotonic())
            for conn in mp.connection.wait(list(running), timeout=0.2):
                proc, item, _ = running.pop(conn)
                try:
                    ok, value = conn.recv()
                except (EOFError, OSError):
                    proc.join()
                    ok, value = False, f"worker died (exit code {proc.exitcode})"
                conn.close()
                proc.join()
                yield item, ok, value
            if timeout:
                now = time.monotonic()
                for conn, (proc, item, start) in list(running.items()):
                    if now - start > timeout:
                        proc.kill()
                        proc.join()
                        conn.close()
                        del running[conn]
                        yield item, False, f"timed out after {timeout:g} s (the decoder may hang on this file)"
    finally:
        for conn, (proc, _, _) in running.items():
            proc.kill()
            proc.join()
            conn.close()


def prefetch(items: Iterable[Any], size: int) -> Iterator[Any]:
    """Produce items in a background thread (JPEG decoding and video decoding release the GIL), so reading
    the next frames overlaps with detection or the model on the current ones. Order is preserved."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=max(1, size))
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((True, item))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put((False, e))
            return
        q.put((True, done))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)
