import os
import signal

from normexp.stop import StopRequests


def test_a_signal_becomes_a_request_read_at_the_next_step_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stop:
        assert stop.decide(log_step=False) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.decide(log_step=False) == signal.SIGTERM  # one process: every step
        # a second SIGTERM would act at once: the previous handler is back for it
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is before
