"""Run a worker from several Python threads at once and re-raise the first failure in the test."""
import threading


def run_in_threads(worker, n_threads: int = 4) -> None:
    """worker(k) for k in range(n_threads), all started before any is joined."""
    errors = []

    def guarded(k):
        try:
            worker(k)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
