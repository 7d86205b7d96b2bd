"""The page: Gradio Blocks over :class:`vqclip.web.jobs.Jobs`. Tabs for Generate, Animate,
Gallery and Search; every value the page shows comes from the library through ``Jobs``.

Prompts, captions and records are shown in text components (Textbox, JSON, gallery captions),
never as HTML or Markdown.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from ..config import list_presets
from .files import form_settings
from .jobs import Jobs, UserError

__all__ = ["CSS", "build"]

# the image fills its frame: the bundled models draw 64 px, which would sit small in 320
CSS = "#gen-live img { width: 100%; height: 100%; object-fit: contain; }"


def _number(label: str, value, elem_id: str, **kw) -> gr.Number:
    return gr.Number(label=label, value=value, precision=kw.pop("precision", 0), elem_id=elem_id,
                     **kw)


def _form(jobs: Jobs, prefix: str, animate: bool) -> dict[str, Any]:
    """The fields of the Generate or Animate form, with the start-up preset's defaults."""
    c = jobs.gen.config
    f: dict[str, Any] = {}
    f["prompt"] = gr.Textbox(label="Prompt", elem_id=f"{prefix}-prompt", lines=2,
                             placeholder="a red circle:1|blurry:-0.3" + (" ^ a blue square" * animate))
    with gr.Row():
        if not animate:
            f["preset"] = gr.Dropdown(list_presets(), value=jobs.preset, label="Preset",
                                      elem_id=f"{prefix}-preset")
        f["seed"] = _number("Seed (-1: random)", -1, f"{prefix}-seed", minimum=-1)
        f["width"] = _number("Width", c.size[0], f"{prefix}-width", minimum=16)
        f["height"] = _number("Height", c.size[-1], f"{prefix}-height", minimum=16)
    with gr.Row():
        if animate:
            a = c.animation
            f["frames"] = _number("Frames", a.frames, f"{prefix}-frames", minimum=1)
            f["first_steps"] = _number("Steps of frame 0", a.first_steps or c.optim.steps,
                                       f"{prefix}-first-steps", minimum=0)
            f["steps_per_frame"] = _number("Steps per frame", a.steps_per_frame,
                                           f"{prefix}-steps-per-frame", minimum=1)
            for key, label in (("zoom", "Zoom"), ("angle", "Angle"), ("translate_x", "Move x"),
                               ("translate_y", "Move y")):
                f[key] = _number(label, a[key], f"{prefix}-{key.replace('_', '-')}", precision=None)
            f["fps"] = _number("FPS", a.fps, f"{prefix}-fps", minimum=1)
        else:
            f["steps"] = _number("Steps", c.optim.steps, f"{prefix}-steps", minimum=1)
            f["cutn"] = _number("Cutouts", c.cutouts.cutn, f"{prefix}-cutn", minimum=1)
            f["candidates"] = _number("Candidates", c.candidates, f"{prefix}-candidates",
                                      minimum=1, maximum=16)
    if not animate:
        with gr.Accordion("Image prompts", open=False):
            f["init_image"] = gr.Image(label="Init image", type="filepath", sources=["upload"],
                                       elem_id=f"{prefix}-init")
            f["image_prompts"] = gr.File(label="Image prompts", file_count="multiple",
                                         file_types=["image"], elem_id=f"{prefix}-image-prompts")
    return f


def _form_values(names, values) -> dict[str, Any]:
    form = dict(zip(names, values))
    if isinstance(form.get("image_prompts"), list):
        form["image_prompts"] = [getattr(p, "name", p) for p in form["image_prompts"]]
    return form


def _loss_frame(run) -> pd.DataFrame:
    rows = [(step, f"candidate {k}", loss) for step, k, loss in list(run.progress.losses)]
    return pd.DataFrame(rows, columns=["step", "candidate", "loss"])


def _score(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _stopper(jobs: Jobs):
    def stop(request: gr.Request) -> None:  # this browser session's run only
        jobs.stop(request.session_hash)

    return stop


def _controls(jobs: Jobs, prefix: str, word: str):
    """A run's form, its button, Go on (the last run, to the form's length), a Stop button
    (wired) and the progress line."""
    animate = prefix == "anim"
    form = _form(jobs, prefix, animate)
    with gr.Row():
        go = gr.Button(word, variant="primary", elem_id=f"{prefix}-go")
        more = gr.Button("Go on to these frames" if animate else "Go on to these steps",
                         elem_id=f"{prefix}-more")
        stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop")
    stop.click(_stopper(jobs), None, None, queue=False)
    status = gr.Textbox(label="Progress", interactive=False, elem_id=f"{prefix}-status")
    return form, go, more, status


def _starter(jobs: Jobs, kind: str, names):
    """How the form's button starts a run, and how Go on does: ``start(request, values)``."""
    def start(request: gr.Request, values):
        return jobs.start(request.session_hash, kind, _form_values(names, values))

    def go_on(request: gr.Request, values):
        length = _form_values(names, values).get("frames" if kind == "animation" else "steps")
        return jobs.go_on(request.session_hash, kind, length)

    return start, go_on


def _handler(show, start):
    """A button's handler: ``show(start, request, values)``, the page's updates for a run that
    ``start`` begins (the framework finds the request by its annotation)."""
    def handle(request: gr.Request, *values):
        yield from show(start, request, values)

    return handle


@contextlib.contextmanager
def _watched(request: gr.Request, start, values):
    """A run started (``start(request, values)``) for this browser session; when the block ends
    (the tab closed too), the run is stopped, keeping what it made, and waited for. Bad values:
    one line."""
    try:
        run, folder = start(request, values)
    except UserError as e:
        raise gr.Error(str(e), print_exception=False) from None
    try:
        yield run, folder
    except UserError as e:
        raise gr.Error(str(e), print_exception=False) from None
    finally:
        if run.running:
            run.stop()
        run.join()


def _generate_tab(jobs: Jobs):
    form, go, more, status = _controls(jobs, "gen", "Generate")
    with gr.Row():
        live = gr.Image(label="Image", format="png", interactive=False, elem_id="gen-live",
                        height=320)
        curve = gr.LinePlot(x="step", y="loss", color="candidate", label="Loss", elem_id="gen-loss")
    ranked = gr.Gallery(label="Candidates, best first", columns=4, format="png",
                        elem_id="gen-ranked", interactive=False)
    table = gr.Dataframe(headers=["rank", "score", "seed", "file"], label="Ranking",
                         interactive=False, elem_id="gen-ranking")
    records = gr.State([])
    chosen = gr.JSON(label="Settings of the chosen candidate", elem_id="gen-settings")
    files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="gen-files")
    names = list(form)

    def generate(start, request: gr.Request, values):
        with _watched(request, start, values) as (run, folder):
            yield {status: "waiting for the first step…", ranked: [], chosen: None, files: None,
                   table: None}
            for _ in run.watch():
                yield {live: jobs.live_image(run), curve: _loss_frame(run), status: jobs.status(run)}
            result = jobs.finish(request.session_hash, run, folder)
        rows = jobs.ranked(result)
        t = result.timings
        done = (f"stopped after {result.steps_done} steps; kept what was made" if result.interrupted
                else f"done: {result.steps_done} steps in {t['steps']:.1f} s "
                     f"({t['per_step']:.3f} s/step)")
        yield {live: rows[0][0], curve: _loss_frame(run), status: f"{done} · seed {result.seeds[0]}",
               ranked: [(p, caption) for p, caption, _ in rows], records: [r for *_, r in rows],
               chosen: rows[0][2], files: [str(p) for p in result.files if p.is_file()],
               table: [[r + 1, _score(rec.get("clip_score")), rec["seed"], Path(p).name]
                       for r, (p, _, rec) in enumerate(rows)]}

    for button, start in zip((go, more), _starter(jobs, "generation", names)):
        button.click(_handler(generate, start), list(form.values()),
                     [live, curve, status, ranked, table, records, chosen, files],
                     concurrency_limit=1, concurrency_id="device")

    def choose(rows, evt: gr.SelectData):
        return rows[evt.index] if 0 <= evt.index < len(rows) else None

    ranked.select(choose, records, chosen)
    return form


def _animate_tab(jobs: Jobs):
    form, go, more, status = _controls(jobs, "anim", "Animate")
    with gr.Row():
        frames = gr.Gallery(label="Frames", columns=6, elem_id="anim-frames", interactive=False)
        video = gr.Video(label="Video", elem_id="anim-video", interactive=False)
    names = list(form)

    def animate(start, request: gr.Request, values):
        with _watched(request, start, values) as (run, folder):
            yield {status: "waiting for the first frame…", video: None, frames: []}
            for _ in run.watch():
                made = sorted(folder.glob("frame-*.png"))
                yield {frames: [str(f) for f in made], status: jobs.status(run, "frame")}
            result = jobs.finish(request.session_hash, run, folder)
        made = [r["path"] for r in result.records]
        movie = next((str(p) for p in result.files if p.suffix in (".mp4", ".gif")
                      and p.is_file()), None)
        word = "stopped" if result.interrupted else "done"
        yield {frames: made, video: movie, status: f"{word}: {len(made)} frames · seed {result.config.seed}"}

    for button, start in zip((go, more), _starter(jobs, "animation", names)):
        button.click(_handler(animate, start), list(form.values()),
                     [frames, video, status], concurrency_limit=1, concurrency_id="device")
    return form


def _gallery_tab(jobs: Jobs, tabs, gen_form, anim_form):
    refresh = gr.Button("Refresh", elem_id="gallery-refresh")
    shown = gr.Gallery(label="Runs, newest first", columns=5, elem_id="gallery", interactive=False)
    entries = gr.State([])
    with gr.Row():
        record = gr.JSON(label="Settings", elem_id="gallery-settings")
        video = gr.Video(label="Video", elem_id="gallery-video", interactive=False)
    load = gr.Button("Load these settings", elem_id="gallery-load")
    picked = gr.State(None)

    def listing():
        runs = jobs.runs()
        return [(str(e.image), e.caption) for e in runs], runs, None, None, None

    def pick(runs, evt: gr.SelectData):
        e = runs[evt.index] if 0 <= evt.index < len(runs) else None
        return (None, None, None) if e is None else (e.record, str(e.video) if e.video else None, e)

    def load_settings(entry, request: gr.Request):
        if entry is None:
            raise gr.Error("choose a run first", print_exception=False)
        values = form_settings(entry.record)
        animation = entry.kind == "animation"
        form = anim_form if animation else gen_form
        tab = "animate" if animation else "generate"
        jobs.remember(request.session_hash, entry.kind,  # Go on continues this run
                      entry.image.parent if animation else entry.image,
                      entry.record.get("config", {}).get("preset"))
        updates = {form[k]: values[k] for k in form if k in values and values[k] is not None}
        return {**updates, tabs: gr.Tabs(selected=tab)}

    refresh.click(listing, None, [shown, entries, record, video, picked])
    shown.select(pick, entries, [record, video, picked])
    load.click(load_settings, picked, [tabs, *gen_form.values(), *anim_form.values()])
    return listing, [shown, entries, record, video, picked]


def _search_tab(jobs: Jobs):
    roots = [str(r) for r in jobs.search_roots]
    with gr.Row():
        query = gr.Textbox(label="Search for", elem_id="search-query", scale=3)
        folder = gr.Dropdown(roots, value=roots[-1], label="Folder", elem_id="search-folder",
                             scale=2)
        top = gr.Number(label="Results", value=8, precision=0, minimum=1, maximum=100,
                        elem_id="search-top")
    go = gr.Button("Search", variant="primary", elem_id="search-go")
    found = gr.Gallery(label="Best first", columns=6, elem_id="search-results", interactive=False)
    scores = gr.Dataframe(headers=["score", "file"], label="Scores", interactive=False,
                          elem_id="search-table")
    gr.Markdown("### Classify an image")
    with gr.Row():
        image = gr.Image(label="Image", type="filepath", sources=["upload"], elem_id="classify-image")
        with gr.Column():
            labels = gr.Textbox(label="Labels, comma-separated", elem_id="classify-labels")
            classify = gr.Button("Classify", elem_id="classify-go")
            probs = gr.Label(label="Probabilities", num_top_classes=10, elem_id="classify-result")

    def run_search(q, f, k):
        try:
            hits = jobs.search(q, f, k or 8)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return [(path, f"{score:.4f} · {name}") for path, score, name in hits], \
            [[f"{score:.4f}", name] for _, score, name in hits]

    def run_classify(path, names):
        try:
            return jobs.classify(path, names)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None

    go.click(run_search, [query, folder, top], [found, scores], concurrency_id="scoring")
    query.submit(run_search, [query, folder, top], [found, scores], concurrency_id="scoring")
    classify.click(run_classify, [image, labels], probs, concurrency_id="scoring")


def build(jobs: Jobs) -> gr.Blocks:
    """The app's Blocks (not launched)."""
    with gr.Blocks(title="vqclip", analytics_enabled=False) as demo:
        gr.Markdown("# vqclip\nText to image with VQGAN+CLIP: generate, animate, browse and search.")
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                gen_form = _generate_tab(jobs)
            with gr.Tab("Animate", id="animate"):
                anim_form = _animate_tab(jobs)
            with gr.Tab("Gallery", id="gallery") as gallery:
                listing, shown = _gallery_tab(jobs, tabs, gen_form, anim_form)
            with gr.Tab("Search", id="search"):
                _search_tab(jobs)
        gallery.select(listing, None, shown)
        demo.load(listing, None, shown)
    return demo
