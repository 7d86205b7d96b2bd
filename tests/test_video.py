"""VideoWriter: a Ctrl-C during a frame's write waits for the frame, wherever it lands."""

import signal
import threading

import numpy as np
import pytest

from vqclip.video import VideoWriter


class OtherThread(threading.Thread):
    """A thread started before the writer, as torch's and the loop's are: the kernel may hand it
    a terminal's Ctrl-C, and Python then raises it in the main thread at its next bytecode."""

    def __init__(self):
        super().__init__(daemon=True)
        self.asked, self.done = threading.Event(), threading.Event()
        self.start()

    def run(self):
        while True:
            self.asked.wait()
            self.asked.clear()
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            self.done.set()

    def ctrl_c(self):
        self.done.clear()
        self.asked.set()
        self.done.wait()


@pytest.fixture
def terminal_ctrl_c():
    """SIGINT as a process started from a terminal has it: Python's handler, which raises
    KeyboardInterrupt. A background job (CI may be one) inherits it ignored, and what ran
    before in the same pytest worker may have left another handler."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers can only be set from the main thread")
def test_ctrl_c_on_any_thread_during_a_frame_is_raised_after_it(tmp_path, terminal_ctrl_c):
    import imageio.v3 as iio

    frames = [np.full((16, 16, 3), 40 * i, np.uint8) for i in range(4)]
    other = OtherThread()
    video = VideoWriter(tmp_path / "v.mp4", fps=5)
    video.append(frames[0])
    write = video._writer._write_gen

    class InterruptedWrite:  # the SIGINT lands while the frame goes to ffmpeg's pipe
        def send(self, frame):
            other.ctrl_c()
            sum(range(10000))  # bytecode where Python would raise it
            return write.send(frame)

    video._writer._write_gen = InterruptedWrite()
    with pytest.raises(KeyboardInterrupt):
        video.append(frames[1])
    video._writer._write_gen = write
    video.append(frames[2])  # ffmpeg is still there: the writer goes on
    video.append(frames[3])
    assert video.count == 4 and video.close() == tmp_path / "v.mp4"
    assert iio.imread(tmp_path / "v.mp4", index=None, plugin="FFMPEG").shape[0] == 4


def test_a_held_ctrl_c_keeps_the_handler_it_found(tmp_path):
    seen, other = [], OtherThread()
    old = signal.signal(signal.SIGINT, lambda *a: seen.append(a[0]))
    try:
        video = VideoWriter(tmp_path / "v.mp4", fps=5)
        video.append(np.zeros((16, 16, 3), np.uint8))
        other.ctrl_c()
        sum(range(10000))
        assert seen == [signal.SIGINT]
        video.close()
    finally:
        signal.signal(signal.SIGINT, old)
