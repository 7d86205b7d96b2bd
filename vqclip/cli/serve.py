"""``vqclip serve``: the web app (the ``web`` extra) on the models of one preset, loaded once."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
import sys
from pathlib import Path

from .common import add_verbosity

__all__ = ["register"]

log = logging.getLogger("vqclip")


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help='the web app in a browser tab (pip install "vqclip[web]")',
        description="A local web app: generate with live progress and a Stop button, animate, "
                    "browse the output folder's runs and load their settings back, search and "
                    "classify. The models load once; one run at a time, the others queue.")
    p.add_argument("--preset", help="the models and default settings (default: imagenet)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="default 7860; 0: any free port")
    p.add_argument("--outputs", default="outputs", metavar="DIR",
                   help="where runs are written, and what the gallery shows (default outputs/)")
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="one more folder the Search tab may read; repeatable")
    p.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password")
    p.add_argument("--yes", action="store_true",
                   help="listen beyond this machine without --auth (anyone who can reach it "
                        "can run the models and read the output folder)")
    p.add_argument("--max-upload", dest="max_upload", type=float, default=20, metavar="MB",
                   help="largest upload accepted (default 20 MB)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    add_verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)


def check_serve_args(args: argparse.Namespace) -> tuple[str, str] | None:
    """The flags, checked before any model loads; returns the (user, password) of --auth."""
    if importlib.util.find_spec("gradio") is None:
        raise ValueError('vqclip serve needs the web extra: pip install "vqclip[web]"')
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_upload <= 0:
        raise ValueError(f"--max-upload must be > 0 MB, got {args.max_upload}")
    for folder in args.search:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--search: no such folder: {folder}")
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise ValueError("--auth takes USER:PASS, both non-empty")
        auth = (user, password)
    if not _loopback(args.host):
        if auth is None and not args.yes:
            raise ValueError(f"--host {args.host} lets other machines reach the app: add --auth "
                             "USER:PASS, or --yes to serve it to anyone who can reach it")
        log.warning("listening on %s: other machines can reach this app%s", args.host,
                    "" if auth else ", without a password")
    return auth


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from ..config import load_config
    from .generate import load_generator

    auth = check_serve_args(args)
    cfg = load_config(preset=args.preset, **({"device": args.device} if args.device else {}))
    gen = load_generator(cfg)
    from ..web import Jobs, launch

    jobs = Jobs(gen, args.outputs, args.search)
    demo, url = launch(jobs, args.host, args.port, auth, args.max_upload, block=False)
    print(f"vqclip serve: {url} (Ctrl-C stops it)", flush=True)
    try:
        demo.block_thread()
    finally:
        demo.close()
    print("vqclip serve: stopped", file=sys.stderr)
    return 0
