"""stop_on_signals: SIGTERM sets the event, however busy the main thread is with that event."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, signal, threading, time
    from runtime.settings import stop_on_signals

    def kill_often():
        for _ in range(300):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.0002)

    with stop_on_signals() as stop:
        killer = threading.Thread(target=kill_often)
        killer.start()
        seen = 0
        while killer.is_alive():  # the main thread spends its time inside Event.wait, holding its lock
            if stop.wait(0):
                stop.clear()
                seen += 1
        killer.join()
        stop.clear()
        os.kill(os.getpid(), signal.SIGTERM)  # one more, now that nothing else comes
        assert stop.wait(5.0), "a SIGTERM did not set the event"
    assert seen > 0
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    print("ok")
    """
)


def test_sigterm_sets_the_event_while_the_main_thread_waits_on_it():
    # a handler that set the event itself would deadlock here: it runs in the main thread,
    # sometimes while the main thread holds the event's lock (it did, once, in CI)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
