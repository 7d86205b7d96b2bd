"""vqclip's web app (the ``web`` extra): ``vqclip serve``, or :func:`launch` from Python.

Importing this package turns the framework's usage analytics off and gives it a private upload
folder, removed at exit, before Gradio is imported (Gradio reads both at import).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no usage reports, no version check
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if not os.environ.get("GRADIO_TEMP_DIR"):  # uploads and the page's copies: this server's alone
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="vqclip-web-")
    atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], ignore_errors=True)

from .jobs import Jobs, UserError  # noqa: E402 - after the environment above
from .layout import CSS, build  # noqa: E402

__all__ = ["Jobs", "UserError", "build", "launch"]

log = logging.getLogger(__name__)


def launch(jobs: Jobs, host: str = "127.0.0.1", port: int | None = 7860,
           auth: tuple[str, str] | None = None, max_upload_mb: float = 20, block: bool = True):
    """Serve the app for ``jobs`` on ``host:port`` (127.0.0.1 unless told otherwise).

    Only the output and search folders (and the framework's own upload folder) can be read
    through it; uploads over ``max_upload_mb`` are refused. One generation or animation runs at a
    time; the others wait in the queue, which the page shows.

    Returns:
        ``(demo, url)``; with ``block``, only once the server stops (Ctrl-C).
    """
    demo = build(jobs)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(
        server_name=host, server_port=port, auth=auth, allowed_paths=[str(r) for r in jobs.search_roots],
        max_file_size=int(max_upload_mb * 2**20), prevent_thread_lock=True, show_error=True, quiet=True,
        ssr_mode=False, mcp_server=False, pwa=False, inbrowser=False, share=False,
        footer_links=["settings"], css=CSS)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo, url
