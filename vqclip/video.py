"""Progress videos: frames streamed to mp4 (H.264 through imageio-ffmpeg's own ffmpeg) or gif."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from .images import temp_path

__all__ = ["VideoWriter", "choose_fps", "ctrl_c_held"]


def choose_fps(num_frames: int, seconds: float = 8.0) -> int:
    """A frame rate that plays ``num_frames`` in about ``seconds``, within 5..30 fps."""
    return max(5, min(30, round(num_frames / seconds)))


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back for the block and hand it to the handler found just after: one
    raised in the hooks of the fork that starts ffmpeg would be lost (Python ignores exceptions
    raised there), and one inside a write to ffmpeg's pipe would end imageio's writer and leave
    half a frame in the pipe. A handler, not a signal mask: the kernel may deliver a terminal's
    Ctrl-C to any thread (torch's, ffmpeg's reader), and Python raises it in the main thread
    all the same. Only the main thread can set handlers, and only it receives KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught:
            signal.raise_signal(signal.SIGINT)  # to that handler: Python's raises KeyboardInterrupt


class VideoWriter:
    """Append ``(H, W, 3)`` uint8 frames; :meth:`close` moves the finished file into place.

    Frames go to a hidden temporary file beside the target, so the target is never half-written.
    ``close(keep=False)`` (on errors) deletes it instead. mp4 frames are streamed to ffmpeg;
    gif frames are kept in memory and written at the end.

    Example:
        >>> with VideoWriter("run.mp4", fps=10) as video:  # doctest: +SKIP
        ...     video.append(frame)
    """

    def __init__(self, path: str | Path, fps: int):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".mp4", ".gif"):
            raise ValueError(f"video {self.path}: the file name must end in .mp4 or .gif")
        self.fps, self.count = fps, 0
        self.tmp = temp_path(self.path)
        self._frames: list[np.ndarray] = []
        self._writer = None

    def append(self, frame: np.ndarray) -> None:
        if self.path.suffix.lower() == ".gif":
            self._frames.append(frame)
            self.count += 1
        else:
            import imageio.v2 as iio

            # ffmpeg starts on the first frame, and each frame is one write to its pipe: neither
            # may be cut short (a lost Ctrl-C, a torn frame)
            with ctrl_c_held():
                if self._writer is None:
                    # macro_block_size=2: keep the exact size (H.264 in yuv420p needs even sides)
                    self._writer = iio.get_writer(self.tmp, format="FFMPEG", fps=self.fps,
                                                  codec="libx264", quality=8, macro_block_size=2,
                                                  ffmpeg_log_level="error")
                self._writer.append_data(frame)
                self.count += 1

    def close(self, keep: bool = True) -> Path | None:
        """Finish the file and move it into place (``keep``), or discard it; returns the path."""
        try:
            if self._writer is not None:
                self._writer.close()
            elif self._frames and keep:
                import imageio.v3 as iio

                iio.imwrite(self.tmp, np.stack(self._frames), extension=".gif",
                            duration=1000 / self.fps, loop=0)
            if keep and self.count:
                os.replace(self.tmp, self.path)
                return self.path
            return None
        finally:
            self._writer, self._frames = None, []
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Ctrl-C keeps what was made; any other error discards the partial file
        self.close(keep=exc_type is None or issubclass(exc_type, KeyboardInterrupt))
