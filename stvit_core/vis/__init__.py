"""What each semantic token looks at: its attention over the image-token grid, and the partition it implies.

One job per module: :mod:`.attention` reads the generator's cross-attention (:func:`semantic_token_attention`,
:func:`token_partition`, :func:`attention_on_region`); :mod:`.draw` draws it with Pillow (:func:`render_figure`,
:func:`render_contact_sheet`); :mod:`.figures` finds the images and writes the figures of ``stvit vis``
(:func:`image_sources`, :func:`visualise_images`).
"""

from .attention import (
    attention_on_region,
    check_vis_arguments,
    cross_attention_probabilities,
    semantic_token_attention,
    semantic_token_generators,
    token_partition,
)
from .draw import FILLS, contact_sheet_size, figure_size, render_contact_sheet, render_figure
from .figures import CONTACT_SHEET_NAME, ImageSource, check_vis_output, image_sources, visualise_images

__all__ = [
    "CONTACT_SHEET_NAME",
    "FILLS",
    "ImageSource",
    "attention_on_region",
    "check_vis_arguments",
    "check_vis_output",
    "contact_sheet_size",
    "cross_attention_probabilities",
    "figure_size",
    "image_sources",
    "render_contact_sheet",
    "render_figure",
    "semantic_token_attention",
    "semantic_token_generators",
    "token_partition",
    "visualise_images",
]
