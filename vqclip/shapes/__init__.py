"""The shapes world: the procedural world that vqclip's bundled offline models were trained on.

A plug-in world, not part of the generation core: the core never imports it, and it stands on the
core's public API (the loaders, ``Generator``, the cutouts) like any other user of vqclip.

- :mod:`~vqclip.shapes.world`: the renderer and its captions (imported here, so
  ``from vqclip.shapes import Scene, render`` works);
- :mod:`~vqclip.shapes.judge`: a pixel-only judge of colour and shape, which scores generation;
- :mod:`~vqclip.shapes.vqgan_trainer` and :mod:`~vqclip.shapes.clip_trainer`: the trainers of the
  tiny VQGAN and CLIP, with :mod:`~vqclip.shapes.training` their shared plumbing;
- :mod:`~vqclip.shapes.loop_trainer`: fine-tuning of the CLIP against the generation loop itself.

Only the world is imported with the package; the trainers load torch's training machinery and the
generator, so they are imported from their modules.
"""

from .world import *  # noqa: F403
from .world import __all__  # noqa: F401
