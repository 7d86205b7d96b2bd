"""The web app without a browser (issue 22): the command's checks, the files it may serve, a run
stopped from the page, and the security of the server over HTTP. The browser tests are in
test_web_browser.py."""

import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port

from vqclip.cli import main

gradio = pytest.importorskip("gradio", reason="the web extra is not installed")

from vqclip.web import Jobs, UserError, launch  # noqa: E402
from vqclip.web.files import form_settings, inside, list_runs  # noqa: E402


def test_serve_without_the_extra_says_which_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gradio" else real(n, *a))
    assert main(["serve", "--preset", "shapes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "vqclip[web]"' in err


@pytest.mark.parametrize("argv, message", [
    (["--host", "0.0.0.0"], "--auth USER:PASS, or --yes"),
    (["--host", "192.168.1.5", "--auth", "alice"], "--auth takes USER:PASS"),
    (["--port", "70000"], "--port"),
    (["--search", "no/such/folder"], "no such folder"),
])
def test_bad_serve_flags_are_one_line_before_any_model_loads(argv, message, capsys):
    assert main(["serve", "--preset", "shapes", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_other_hosts_with_yes_or_auth_are_served_with_a_warning(caplog):
    from vqclip.cli import parse_args
    from vqclip.cli.serve import check_serve_args

    assert check_serve_args(parse_args(["serve", "--host", "0.0.0.0", "--yes"])) is None
    assert "without a password" in caplog.text
    assert check_serve_args(parse_args(["serve", "--host", "::", "--auth", "a:b:c"])) == ("a", "b:c")
    assert check_serve_args(parse_args(["serve", "--host", "::1"])) is None  # loopback: no warning


def test_inside_refuses_dotdot_absolute_paths_and_symlinks_out(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "secret.txt"
    (root / "run").mkdir(parents=True)
    outside.write_text("secret")
    (root / "run" / "a.png").write_bytes(b"x")
    (root / "link.png").symlink_to(outside)
    assert inside(root / "run" / "a.png", root) == (root / "run" / "a.png").resolve()
    assert inside(root / "run" / ".." / ".." / "secret.txt", root) is None
    assert inside(outside, root) is None
    assert inside(root / "link.png", root) is None
    assert inside(root / "missing.png", root) is None


SMALL = dict(size=[32, 32], cutn=4)


def _run(gen, folder: Path, prompt: str, seed: int, **kwargs):
    return gen.generate(prompt, seed=seed, steps=3, output=str(folder / "final.png"), **SMALL,
                        **kwargs)


def test_gallery_lists_runs_newest_first_with_their_settings_and_no_symlinks_out(
        tiny_generator, tmp_path):
    out = tmp_path / "out"
    _run(tiny_generator, out / "old", "an old run", 5)
    time.sleep(0.05)
    _run(tiny_generator, out / "new", "a new run", 7, candidates=2, video=str(out / "new" / "final.mp4"))
    tiny_generator.animate("a story ^ goes on", seed=3, frames=2, steps_per_frame=2,
                           steps=2, output=str(out / "anim"), **SMALL)
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere.png")
    (out / "link.png").symlink_to(tmp_path / "elsewhere.png")
    runs = list_runs(out)
    assert [(e.kind, e.record["prompt"]) for e in runs] == [
        ("animation", "goes on"), ("generation", "a new run"), ("generation", "a new run"),
        ("generation", "an old run")]
    assert runs[0].image.name == "frame-00001.png" and runs[0].video.name == "animation.mp4"
    assert runs[1].video == (out / "new" / "final.mp4").resolve()
    settings = form_settings(runs[-1].record)
    assert (settings["prompt"], settings["seed"], settings["steps"]) == ("an old run", 5, 3)
    assert form_settings(runs[0].record)["frames"] == 2


def test_stop_ends_a_run_after_its_step_and_keeps_what_it_made(tiny_generator, tmp_path):
    jobs = Jobs(tiny_generator, tmp_path / "out")
    run, folder = jobs.start("session", "generation", {"prompt": "a stop", "steps": 500, "seed": 1,
                                                          "width": 32, "height": 32, "cutn": 4})
    seen = 0
    for progress in run.watch(every=0.01):
        seen += 1
        if seen == 2:
            assert jobs.stop("session")
    result = jobs.finish("session", run, folder)
    assert result.interrupted and 2 <= result.steps_done < 500
    record = json.loads(json.dumps(result.info(0)))
    assert record["interrupted"] and (folder / "final.png").is_file()
    assert not jobs.stop("session")  # nothing runs any more


def test_go_on_continues_the_sessions_run_in_its_folder_bit_for_bit(tiny_generator, tmp_path):
    jobs = Jobs(tiny_generator, tmp_path / "out")
    form = {"prompt": "a circle", "seed": 2, "width": 32, "height": 32, "cutn": 4, "candidates": 2}
    with pytest.raises(UserError, match="no generation to go on with"):
        jobs.go_on("s", "generation", 6)
    run, whole = jobs.start("other", "generation", dict(form, steps=6))
    whole_losses = jobs.finish("other", run, whole).losses
    run, folder = jobs.start("s", "generation", dict(form, steps=3))
    jobs.finish("s", run, folder)
    with pytest.raises(UserError, match="the run has 3 steps; set Steps above that"):
        jobs.go_on("s", "generation", 3)
    run, again = jobs.go_on("s", "generation", 6)
    assert again == folder and run.progress.done == 3 and run.progress.seconds_left is None
    result = jobs.finish("s", run, folder)
    assert result.steps_done == 6 and len(list(jobs.outputs.iterdir())) == 2
    assert run.progress.version == 3  # only the rest ran: one callback a step
    losses = np.array([[loss for s, k, loss in run.progress.losses if s == step] for step in range(6)])
    assert np.allclose(losses, whole_losses.numpy(), atol=1e-6)  # the curve so far, then the rest
    for k in range(2):
        assert np.array_equal(np.asarray(Image.open(folder / f"final-{k}.png")),
                              np.asarray(Image.open(whole / f"final-{k}.png")))


def test_go_on_continues_an_animation_loaded_from_the_gallery(tiny_generator, tmp_path):
    jobs = Jobs(tiny_generator, tmp_path / "out")
    run, folder = jobs.start("maker", "animation", {"prompt": "a circle", "seed": 1, "frames": 2,
                                                     "first_steps": 2, "steps_per_frame": 1,
                                                     "width": 32, "height": 32, "cutn": 4})
    jobs.finish("maker", run, folder)
    entry = next(e for e in jobs.runs() if e.kind == "animation")
    jobs.remember("viewer", "animation", entry.image.parent, None)  # the gallery's Load
    run, again = jobs.go_on("viewer", "animation", 3)
    result = jobs.finish("viewer", run, again)
    assert again == folder and [Path(r["path"]).name for r in result.records] == [
        "frame-00000.png", "frame-00001.png", "frame-00002.png"]


def test_bad_form_values_are_one_line_and_make_no_folder(tiny_generator, tmp_path):
    jobs = Jobs(tiny_generator, tmp_path / "out")
    with pytest.raises(UserError, match="type a prompt"):
        jobs.start("s", "generation", {"prompt": "  "})
    with pytest.raises(UserError, match="steps"):
        jobs.start("s", "generation", {"prompt": "x", "steps": -1})
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 MP: over Pillow's decompression-bomb limit
    with pytest.raises(UserError, match="cannot read image"):
        jobs.start("s", "generation", {"prompt": "x", "init_image": str(bomb)})
    assert list((tmp_path / "out").iterdir()) == []


# -- over HTTP --------------------------------------------------------------------------------

pytestmark = pytest.mark.xdist_group("http")  # under pytest -n: one server for the module
@pytest.fixture(scope="module")
def connections():
    """Every address this process connects a socket to, while the module's server runs."""
    seen, real = [], socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            seen.append(address)
        return real(self, address)

    socket.socket.connect = connect
    yield seen
    socket.socket.connect = real


@pytest.fixture(scope="module")
def served(tiny_generator, tmp_path_factory, connections):
    """The app on the tiny models, on a free loopback port, with a password and a 1 MB upload
    limit; its output folder holds one real file and a symlink out of it."""
    base = tmp_path_factory.mktemp("served")
    out, secret = base / "out", base / "secret.txt"
    (out / "run").mkdir(parents=True)
    secret.write_text("not for the web")
    Image.new("RGB", (8, 8), "red").save(out / "run" / "ok.png")
    (out / "run" / "link.txt").symlink_to(secret)
    demo, url = launch(Jobs(tiny_generator, out), port=free_port(), auth=("alice", "pw"),
                       max_upload_mb=1, block=False)
    yield url.rstrip("/"), out, secret
    demo.close()


def _get(url: str, cookie: str | None = None, data: bytes | None = None, headers=None):
    request = urllib.request.Request(url, data=data, headers={**({"Cookie": cookie} if cookie else {}),
                                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


@pytest.fixture(scope="module")
def cookie(served):
    url = served[0]
    status, body, headers = _get(f"{url}/login", data=b"username=alice&password=pw",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, body
    return "; ".join(c.split(";")[0] for c in headers.get_all("set-cookie"))


def test_it_listens_on_the_loopback_by_default(served):
    assert served[0].startswith("http://127.0.0.1:")


def test_without_the_password_nothing_is_served(served):
    url, out, _ = served
    assert _get(f"{url}/config")[0] == 401
    assert _get(f"{url}/gradio_api/file={out / 'run' / 'ok.png'}")[0] == 401
    assert _get(f"{url}/login", data=b"username=alice&password=no",
                headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 400


def test_files_in_the_output_folder_are_served_and_nothing_else(served, cookie):
    url, out, secret = served
    status, body, _ = _get(f"{url}/gradio_api/file={out / 'run' / 'ok.png'}", cookie)
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"  # the positive control
    for path in (f"{out}/run/../../secret.txt", f"{out}/../secret.txt", str(secret), "/etc/passwd",
                 f"{out}/run/link.txt", "../../../../etc/passwd"):
        status, body, _ = _get(f"{url}/gradio_api/file={path}", cookie)
        assert status in (403, 404), (path, status)
        assert b"not for the web" not in body and b"root:" not in body


def test_uploads_over_the_limit_are_refused(served, cookie):
    url = served[0]
    boundary = "vqclipboundary"

    def upload(size: int):
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                f"filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + \
            b"\0" * size + f"\r\n--{boundary}--\r\n".encode()
        return _get(f"{url}/gradio_api/upload", cookie, body,
                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})[0]

    assert upload(1000) == 200
    assert upload(2 * 2**20) == 413


def test_no_connection_leaves_the_machine(served, cookie, connections):
    """Usage analytics are off: since before the app was built, this process connected to no
    other machine (every connect() is recorded)."""
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert _get(f"{served[0]}/config", cookie)[0] == 200
    assert connections, "the recorder saw nothing: it cannot have been in place"
    assert [a for a in connections if a[0] not in ("127.0.0.1", "::1", "localhost")] == []
